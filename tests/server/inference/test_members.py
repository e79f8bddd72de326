"""Finding the base model and the member adapters of a federated run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from privtune.common.errors import PrivtuneError
from privtune.common.federation.provenance import DEPENDS_ON, DependsOn, manifest_file, record_depends_on
from privtune.common.offsite import load_adapter, save_adapter
from privtune.server.inference.members import ServedModel, from_arguments, from_run_folder
from privtune.server.run_folder import RunFolder
from tests.server.inference.running import MODEL, make_adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"), n=4)


def run_folder(root, adapters):
    """A run laid out as the federated server writes it (RunFolder): two owners' members and the
    aggregate, each recording the data it depends on."""
    folder = RunFolder(root)
    for name, source, owners in [
        ("node-1", adapters[0], ("node-1",)),
        ("node-2", adapters[1], ("node-2",)),
        ("aggregate", adapters[2], ("node-1", "node-2")),
    ]:
        state, manifest = load_adapter(source)
        record_depends_on(folder.save_owner_adapter(name, state, manifest.to_dict()), DependsOn(owners))
    folder.write_metrics({"config": {"model": MODEL}})
    return root


def test_run_folder_members_exclude_the_aggregate(tmp_path, adapters):
    served = from_run_folder(run_folder(tmp_path / "run", adapters))
    assert served.model == MODEL
    assert [p.rsplit("/", 1)[1] for p in served.adapters] == ["node-1", "node-2"]
    members = served.load_members()
    assert [m.name for m in members] == ["node-1", "node-2"] and members[0].manifest.mode == "lora"
    assert from_run_folder(tmp_path / "run", "tiny-gpt2").model == "tiny-gpt2"
    # privtune simulate/demo --out OUT keeps the server's run folder in OUT/server
    run_folder(tmp_path / "out" / "server", adapters)
    assert from_run_folder(tmp_path / "out").n_members == 2


def test_explicit_adapters_and_helpful_errors(tmp_path, adapters):
    served = from_arguments(None, MODEL, adapters)
    assert served.n_members == 4
    with pytest.raises(PrivtuneError, match="name what to serve"):
        from_arguments(None, MODEL, None)
    with pytest.raises(PrivtuneError, match="do not exist"):
        from_arguments(None, MODEL, [str(tmp_path / "nowhere")])
    with pytest.raises(PrivtuneError, match="public-embeddings .* does not exist.*keyed-public"):
        from_arguments(None, MODEL, adapters, str(tmp_path / "p0.safetensors"))
    assert from_arguments(None, MODEL, adapters).load_public_embeddings(None) is None
    with pytest.raises(PrivtuneError, match="no adapters/ folder"):
        from_run_folder(tmp_path)
    run = run_folder(tmp_path / "run", adapters)
    (run / "metrics.json").unlink()
    with pytest.raises(PrivtuneError, match="pass it with --model"):
        from_run_folder(run)
    broken = tmp_path / "broken"
    shutil.copytree(adapters[0], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(PrivtuneError, match="corrupt"):
        from_arguments(None, MODEL, [str(broken)])


def copy_as(adapter: str, folder: Path, depends_on: DependsOn | None) -> str:
    """A copy of ``adapter`` in ``folder`` recording ``depends_on`` (or nothing)."""
    shutil.copytree(adapter, folder)
    manifest = json.loads(manifest_file(folder).read_text())
    manifest.pop(DEPENDS_ON)
    manifest_file(folder).write_text(json.dumps(manifest))
    if depends_on is not None:
        record_depends_on(folder, depends_on)
    return str(folder)


def retrained(adapter: str, folder: Path, depends_on: DependsOn) -> str:
    """``adapter`` with other values (as another training would give) recording ``depends_on``."""
    state, manifest = load_adapter(adapter)
    save_adapter(folder, {k: v + 0.01 for k, v in state.items()}, manifest)
    record_depends_on(folder, depends_on)
    return str(folder)


def test_members_that_share_data_are_refused_by_name(tmp_path, adapters):
    a, b = adapters[0], adapters[1]  # owner-0 and owner-1
    with pytest.raises(PrivtuneError, match=r"named more than once"):
        from_arguments(None, MODEL, [a, a, a])
    twin = copy_as(a, tmp_path / "twin", DependsOn(("owner-7",)))
    with pytest.raises(PrivtuneError, match=r"owner-0 and .*twin are identical adapters"):
        from_arguments(None, MODEL, [a, twin])
    unknown = copy_as(b, tmp_path / "unknown", None)
    with pytest.raises(PrivtuneError, match=r"unknown does not record which owners' data"):
        from_arguments(None, MODEL, [a, unknown])
    aggregate = retrained(b, tmp_path / "aggregate", DependsOn(("owner-0", "owner-1")))
    with pytest.raises(PrivtuneError, match=r"aggregate depends on 2 owners \(owner-0, owner-1\)"):
        from_arguments(None, MODEL, [aggregate])
    second = retrained(b, tmp_path / "second", DependsOn(("owner-0",)))
    with pytest.raises(
        PrivtuneError, match=r"owner-0 \(owner-0\) and .*second \(owner-0\) share data of owner owner-0"
    ):
        from_arguments(None, MODEL, [a, second])
    with pytest.raises(PrivtuneError, match="share data of owner owner-0"):  # also where replicas load them
        ServedModel(MODEL, (a, second)).load_members()


def test_disjoint_shards_of_one_owner_are_separate_members(tmp_path, adapters):
    shards = [retrained(adapters[i], tmp_path / f"s{i}", DependsOn(("owner-0",), i, 3, "split-a")) for i in range(3)]
    assert from_arguments(None, MODEL, [*shards, adapters[1]]).n_members == 4
    other_split = retrained(adapters[3], tmp_path / "other", DependsOn(("owner-0",), 2, 3, "split-b"))
    same_index = retrained(adapters[3], tmp_path / "same", DependsOn(("owner-0",), 0, 3, "split-a"))
    other_count = retrained(adapters[3], tmp_path / "count", DependsOn(("owner-0",), 3, 4, "split-a"))
    for overlapping in (other_split, same_index, other_count, adapters[0]):
        with pytest.raises(PrivtuneError, match="share data of owner owner-0"):
            from_arguments(None, MODEL, [shards[0], shards[1], overlapping])
