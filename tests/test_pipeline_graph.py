"""The built pipeline's graph: only the listing step grows with the number of files.

Beam pickles (and bz2-compresses) every step's function with what it captures, when it
builds the graph and again when it runs each step; a step that captured the whole listing
cost ~0.3 s per step at 16,000 files.
"""

from pipelines.preprocessing import pipeline as preprocess_pipeline
from pipelines.preprocessing.options import parse_args
from pipelines.preprocessing.sources import Listing, SourceFile


def step_payload_bytes(files: int, tmp_path) -> dict[str, int]:
    listing = Listing(
        sources=tuple(SourceFile(f"/data/raw/class{i % 7}/{i:06d}-a-longish-file-name.jpg",
                                 (f"class{i % 7}",)) for i in range(files)),
        skipped=(), hidden=0)
    config, options = parse_args(["--input", "/data/raw", "--output", str(tmp_path / "out")])
    pipeline = preprocess_pipeline.build_pipeline(config, options, listing)  # built, never run
    proto = pipeline.to_runner_api()
    return {t.unique_name: len(t.spec.payload) for t in proto.components.transforms.values()}


def test_only_the_listing_step_grows_with_the_files(tmp_path):
    few, many = step_payload_bytes(10, tmp_path / "few"), step_payload_bytes(3000, tmp_path)
    grown = {name for name in many if many[name] > few.get(name, 0) + 2000}
    assert grown and all(name.startswith("ListedFiles") for name in grown), grown
