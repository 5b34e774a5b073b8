#!/usr/bin/env bash
# Prepare the ignored folders that benchmarks/gpu_check.sh and gpu_scale.sh need on a machine
# with a GPU but no network and no model weights: .whl/ (wheels of the packages that machine lacks, for its
# Python 3.12) and .gpu/smollm2-135m/ (config and tokenizer of the zoo default, no weights; the
# check builds random weights from them). Run here, with network to PyPI and the model converted.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .gpu/smollm2-135m
# Versions as in this venv; the image there has torch, accelerate, pandas, pyarrow, numpy, scipy,
# tokenizers, msgpack, psutil, toolz, cloudpickle, jinja2, click (older) ...
for w in transformer_lens==4.3.0 datasets==5.2.0 dill==0.4.1 fsspec==2026.9.0 httpcore2==2.16.2 \
         httpx2==2.16.2 huggingface_hub==2.4.0 multiprocess==0.70.19 transformers==5.24.0 truststore==0.10.5 \
         dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 tornado==6.6.1 \
         zict==3.0.0 nnsight==0.8.1 greenlet==3.5.6 pydantic==2.14.4 pydantic_core==2.50.5 \
         annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 zstandard==0.25.0 \
         plotly==7.1.0 platformdirs==4.14.8 click==8.5.1 websocket-client; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done
# This package as a wheel: its entry points register the detectors (a bare PYTHONPATH would not).
rm -f .whl/interp_workbench-*.whl
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl .
src=$(.venv/bin/python -c "from interp.model.zoo import model_dir; print(model_dir('smollm2-135m'))")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$src/$f" ] && cp "$src/$f" .gpu/smollm2-135m/
done
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
du -sh .whl .gpu
