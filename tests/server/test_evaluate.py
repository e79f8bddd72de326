import json

import pytest

from privtune.cli import main
from privtune.common.corpus import local_documents
from privtune.common.models import load_model
from privtune.common.offsite.evaluate import perplexity
from privtune.common.packing import holdout_split, pack, pack_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_evaluate_scores_only_the_responses_of_conversations(tmp_path):
    data = tmp_path / "chats"
    data.mkdir()
    lines = [
        {"prompt": f"Question {i}: what rhymes with day and night and light?", "response": f"Answer {i}: may, bright."}
        for i in range(60)
    ]
    (data / "chat.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    package = tmp_path / "pkg"
    prepare = ["prepare", "--model", "tiny-gpt2", "--k-bottom", "1", "--k-top", "1", "--n-emulator", "1"]
    assert main([*prepare, "--no-distill", "-o", str(package)]) == 0
    table_path = tmp_path / "table.json"
    evaluate = ["evaluate", "--package", str(package), "--model", "tiny-gpt2", "--data", str(data)]
    assert main([*evaluate, "--block-size", "64", "--eval-blocks", "4", "--json", str(table_path)]) == 0

    loaded = load_model("tiny-gpt2")
    heldout = holdout_split(local_documents(data), 0.1).heldout
    responses_only = perplexity(loaded.model, pack_rows(heldout, loaded.tokenizer, 64, max_blocks=4))
    every_token = perplexity(loaded.model, pack(heldout, loaded.tokenizer, 64, max_blocks=4))
    zero_shot = json.loads(table_path.read_text())["zero_shot"]
    assert zero_shot == pytest.approx(responses_only, rel=1e-5)
    assert abs(responses_only - every_token) > 1e-3 * every_token
