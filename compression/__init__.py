"""Policies that shrink a per-user attention state, their spec grammar, the state codec, offline benchmark."""
