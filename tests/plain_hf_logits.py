"""Logits of saved model folders, computed by plain transformers in a process of its own.

    python tests/plain_hf_logits.py REQUEST.json OUT.pt FOLDER [FOLDER ...]

REQUEST.json holds ``prompts`` (lists of token ids) and ``attn_implementation`` (None:
transformers' default). OUT.pt gets, per folder, the fp32 logits [tokens, vocab] of each prompt
(one forward pass each, no padding) and the vocabulary of the tokenizer ``AutoTokenizer`` loads
from the folder. The workbench runs models with eager attention; transformers' default (sdpa)
differs from it by float rounding (6e-5 on smollm2-135m's logits, pruned or not), so a test that
compares with the workbench at 1e-5 asks for eager. The script imports torch and transformers
only, and fails if anything of interp-workbench was imported (this is the "any transformers
user" of the pruned-model acceptance test); the tests run it with ``python -I`` and without
PYTHONPATH.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    request_path, out_path, *folders = sys.argv[1:]
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    result = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=request["attn_implementation"]).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with torch.no_grad():
            logits = [model(torch.tensor([ids])).logits[0].float() for ids in request["prompts"]]
        result[folder] = {"logits": logits, "vocab": tokenizer.get_vocab()}
    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("interp", "circuits", "app"))
    if ours:
        raise SystemExit(f"interp-workbench modules were imported: {ours[:5]}")
    torch.save(result, out_path)


def fresh_logits(
    folders: list[Path], prompts: list[list[int]], work: Path, attn_implementation: str | None = "eager"
) -> dict[str, Any]:
    """Run this script in a new interpreter (``-I``, PYTHONPATH dropped) on ``folders``; its
    result per folder (by ``str(folder)``). Raises with the child's stderr when it fails."""
    request, out = work / "request.json", work / "logits.pt"
    request.write_text(json.dumps({"prompts": prompts, "attn_implementation": attn_implementation}), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", __file__, str(request), str(out), *map(str, folders)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"plain_hf_logits.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return torch.load(out)


if __name__ == "__main__":
    main()
