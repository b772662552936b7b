"""`pytest --torch-only`: the tests that need torch alone (with pytest, pytest-timeout and
hypothesis): the optimizer library, tvlars.optim. CI runs them a second time on the oldest
torch pyproject.toml declares (.ci/run, constraints-oldest.txt). Cases that compare with timm
or transformers skip where those are missing.
"""

TORCH_ONLY_TESTS = ("test_optim*.py", "test_version.py")  # in tests/


def pytest_addoption(parser):
    parser.addoption("--torch-only", action="store_true",
                     help=f"collect only the tests that need torch alone ({', '.join(TORCH_ONLY_TESTS)})")


def pytest_ignore_collect(collection_path, config):
    if (config.getoption("torch_only") and collection_path.name.startswith("test_")
            and collection_path.suffix == ".py" and not any(collection_path.match(p) for p in TORCH_ONLY_TESTS)):
        return True
    return None
