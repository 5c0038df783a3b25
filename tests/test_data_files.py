from pathlib import Path

from unisparse.worlds.export import export_benchmarks

DATA = Path(__file__).resolve().parents[1] / "data"


def test_committed_benchmark_metadata_matches_the_generator(tmp_path):
    """data/ publishes the exact prompts and splits; it must not drift from the code."""
    for fresh in export_benchmarks(tmp_path):
        committed = DATA / fresh.name
        assert committed.exists(), f"run `unisparse export-benchmarks` to create {committed}"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: rerun `unisparse export-benchmarks`"
