"""Open Inference Protocol v2 (KServe v2 / Triton HTTP): filled in by issue 12."""


def install(app) -> None:
    pass


def openapi_paths(settings, core) -> dict:
    return {}
