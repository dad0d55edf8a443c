"""Writing the output folder: claimed at start, `manifest.json` written last.

A run first claims the folder (`pipelines.contract.ownership`: refused unless it is empty
or provably ours), deletes an earlier manifest before anything else, and writes its own
only after every shard and side file is in place and only while its claim still names
it, so a killed or overtaken run never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

from apache_beam.io.filesystems import FileSystems

from pipelines.contract import error_budget, ownership, tfds_metadata
from pipelines.contract.error_budget import TooManyErrors
from pipelines.contract.jsonio import write_json_atomically
from pipelines.contract.manifest import (
    ERRORS_PATH,
    FORMAT_VERSION,
    IN_PROGRESS,
    INDEX_PATH,
    MANIFEST,
    OUTPUT_ENTRIES,
    Accounting,
    ImageSpec,
    Manifest,
    ShardEntry,
    SplitEntry,
    join,
)
from pipelines.preprocessing.options import PreprocessConfig
from pipelines.preprocessing.sources import ListingCounts


def input_paths(config: PreprocessConfig) -> dict[str, str | None]:
    """{flag: path} of everything the run reads, which the output may not overlap."""
    csv_folder = None
    if config.labels_csv:
        csv_folder = (config.labels_csv.rsplit("/", 1)[0] if "/" in config.labels_csv
                      else ".")  # a bare file name: the current folder
    return {"--input": config.input, "--labels (its folder)": csv_folder,
            "--reuse_from": config.reuse_from, "--baseline_stats": config.baseline_stats}


def prepare_output(config: PreprocessConfig,
                   lease_s: float = ownership.LEASE_S) -> ownership.OutputClaim:
    """Claims `config.output` for run `config.run_id` and removes what an earlier run of
    ours left there; raises OutputRefused (a UsageError), having touched nothing, when the
    output overlaps an input, is not provably ours, or a live run holds it."""
    ownership.refuse_overlaps(config.output, input_paths(config))
    return ownership.claim_output(config.output, OUTPUT_ENTRIES, config.overwrite,
                                  FORMAT_VERSION, run_id=config.run_id, lease_s=lease_s)


remove_tree = ownership.remove_tree


def _write_text(path: str, text: str) -> None:
    with FileSystems.create(path) as handle:
        handle.write(text.encode())


def build_manifest(
    config: PreprocessConfig,
    listing: ListingCounts,
    labels: Sequence[str],
    shards: Sequence,
    errors: Sequence,
    duplicates: int,
    label_conflicts: int,
    extra: dict | None = None,
) -> Manifest:
    """The manifest of this run; checks that every input file is accounted for. `extra`:
    the statistics phase's fields (paths of what it wrote, its timings)."""
    splits = {name: _split_entry(name, labels, shards) for name, _ in config.splits}
    written = sum(entry.num_examples for entry in splits.values())
    accounting = Accounting(
        files_seen=listing.files_seen,
        images_written=written,
        duplicates=duplicates,
        label_conflicts=label_conflicts,
        errors=len(errors),
        skipped=len(listing.skipped),
        hidden_ignored=listing.hidden,
        reused=sum(getattr(s, "num_reused", 0) for s in shards),
        reuse_mismatches=sum(getattr(s, "num_reuse_mismatch", 0) for s in shards),
    )
    accounted = written + duplicates + len(errors) + len(listing.skipped)
    if accounted != listing.files_seen:
        raise RuntimeError(f"accounting mismatch: {listing.files_seen} files seen, "
                           f"{accounted} accounted for ({accounting})")
    image = config.image
    return Manifest(
        input=config.input or config.labels_csv,
        config=config.to_json(),
        image=ImageSpec(height=image.height, width=image.width, channels=3,
                        format=image.image_format.value, resize=image.resize.value),
        labels=tuple(labels),
        splits=splits,
        accounting=accounting,
        skipped=tuple({"uri": s.uri, "reason": s.reason} for s in listing.skipped),
        **(extra or {}),
    )


def _split_entry(name: str, labels: Sequence[str], shards: Sequence) -> SplitEntry:
    members = sorted((s for s in shards if s.split == name), key=lambda s: s.index)
    class_counts: Counter[str] = Counter({label: 0 for label in labels})
    for shard in members:
        class_counts.update(shard.class_counts)
    return SplitEntry(
        num_examples=sum(s.num_examples for s in members),
        class_counts=dict(class_counts),
        shards=tuple(ShardEntry(path=s.path, num_examples=s.num_examples,
                                num_bytes=s.num_bytes) for s in members),
    )


def error_budget_problem(accounting: Accounting, max_error_rate: float) -> str | None:
    """Why a run with this accounting failed, or None (`contract.error_budget`'s rule)."""
    return error_budget.error_budget_problem(accounting.image_files, accounting.errors,
                                             accounting.images_written, max_error_rate)


def describe_failure(root: str, problem: str, top: int = 5) -> str:
    """`problem`, the most common dead-letter reasons and where the dead letters are."""
    reasons: Counter[str] = Counter()
    path = join(root, ERRORS_PATH)
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            for line in handle.read().decode().splitlines():
                reasons[json.loads(line)["reason"]] += 1
    except Exception:  # noqa: BLE001 - the reasons are a courtesy; the problem is the message
        pass
    listed = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(top))
    return (f"{problem}; top reasons: {listed or 'none recorded'}; dead letters: {path}; "
            "no manifest.json was written")


def write_outputs(
    config: PreprocessConfig, manifest: Manifest, errors: Sequence, shards: Sequence = ()
) -> None:
    """Writes the dead letters and the image index, then the manifest (last), while the
    output's claim is still this run's. Raises TooManyErrors instead of writing the
    manifest when the accounting is over the error budget."""
    root = config.output
    lines = sorted(error.to_json() for error in errors)
    _write_text(join(root, ERRORS_PATH), "".join(line + "\n" for line in lines))
    # Each shard's lines are in file order: sorted by (path, offset) overall.
    _write_text(join(root, INDEX_PATH),
                "".join(shard.index_lines for shard in sorted(shards, key=lambda s: s.path)))
    remove_tree(join(root, "_tmp"))
    problem = error_budget_problem(manifest.accounting, config.max_error_rate)
    if problem:
        raise TooManyErrors(describe_failure(root, problem))
    tfds_metadata.write_metadata(root, manifest)  # tfds.builder_from_directory reads it
    if config.run_id:
        ownership.check_still_ours(root, config.run_id)
    # A fixed temporary name, one of OUTPUT_ENTRIES: a kill leaves nothing unlisted.
    write_json_atomically(join(root, MANIFEST), manifest.to_json(),
                          temporary=join(root, MANIFEST + ".tmp"))
    # The claim goes after the manifest: a leftover claim beside a manifest is harmless.
    remove_tree(join(root, IN_PROGRESS))


