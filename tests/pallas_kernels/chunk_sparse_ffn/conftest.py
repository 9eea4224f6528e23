"""Parametrises each implementation's ``case`` fixture by its class's ``cases``."""


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and metafunc.cls is not None and hasattr(metafunc.cls, "cases"):
        cases = metafunc.cls.cases
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])
