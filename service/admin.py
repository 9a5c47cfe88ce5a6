"""The admin API (model versions): filled in by issue 14."""


def install(app) -> None:
    pass
