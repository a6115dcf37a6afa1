"""serving: the online path of the loop (model runtime, KServe server, canary split, deployment)."""
