"""One benchmark case per (dataset, method, seed); the cases come from benchmarks/conftest.py.

Nothing here names a method or a dataset: ``pytest_generate_tests`` enumerates the method
registry and db3kd.config.DATASETS, so registering a method adds its cases.
"""


def test_distill(case, run_case):
    record = run_case(case)
    assert record["dataset"] == case.dataset and record["method"] == case.method and record["seed"] == case.seed
    assert 0.0 <= record["student_accuracy"] <= 1.0
    assert record["queries_total"] >= 0
