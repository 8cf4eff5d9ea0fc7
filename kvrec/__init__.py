"""kvrec: an online inference serving simulator for long-sequence ("generative") recommenders.

Installed, the repository's top-level folders live under this one namespace (pyproject.toml maps them):

    kvrec.models       data, synthetic generator, backbones, the per-user state contract, training, metrics
    kvrec.compression  policies, their spec grammar, the state codec, the one serving step, `bench offline`
    kvrec.server       FastAPI app, the state store interface and its Redis implementation, metrics
    kvrec.loadtest     Locust replay, the policy sweep and its report, the demo
    kvrec.cli          the one `kvrec` console script, at the top of the import graph

Dependencies point one way: models <- compression <- server; loadtest talks to the server over HTTP.
"""
