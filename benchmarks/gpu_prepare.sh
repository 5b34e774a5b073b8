#!/usr/bin/env bash
# Prepare the ignored folders that benchmarks/gpu_check.sh needs on a machine with a GPU but no
# network and no model weights: .whl/ (wheels of the packages that machine lacks, for its
# Python 3.12) and .gpu/smollm2-135m/ (config and tokenizer of the zoo default, no weights; the
# check builds random weights from them). Run here, with network to PyPI and the model converted.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .gpu/smollm2-135m
for w in transformer_lens==4.3.0 datasets==5.2.0 dill==0.4.1 fsspec==2026.9.0 httpcore2==2.16.2 \
         httpx2==2.16.2 huggingface_hub==2.4.0 multiprocess==0.70.19 transformers==5.24.0 truststore==0.10.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$w"
done
src=$(.venv/bin/python -c "from interp.zoo import model_dir; print(model_dir('smollm2-135m'))")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$src/$f" ] && cp "$src/$f" .gpu/smollm2-135m/
done
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
du -sh .whl .gpu
