"""Finding the base model and the member adapters of a federated run folder."""

from __future__ import annotations

import shutil

import pytest

from privtune.common.errors import PrivtuneError
from privtune.common.offsite import load_adapter
from privtune.server.inference.members import from_arguments, from_run_folder
from privtune.server.run_folder import RunFolder
from tests.server.inference.running import MODEL, make_adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"), n=3)


def run_folder(root, adapters):
    """A run laid out as the federated server writes it (RunFolder), with an aggregate adapter too."""
    folder = RunFolder(root)
    for name, source in [("node-1", adapters[0]), ("node-2", adapters[1]), ("aggregate", adapters[2])]:
        state, manifest = load_adapter(source)
        folder.save_owner_adapter(name, state, manifest.to_dict())
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
    assert served.n_members == 3
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
        from_arguments(None, MODEL, [str(broken)]).load_members()
