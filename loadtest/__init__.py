"""Locust replay of user streams against the service, the policy sweep and its report."""
