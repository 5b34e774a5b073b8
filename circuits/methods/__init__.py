"""The methods the detectors share: greedy decoding, DeCoRe generation and scoring, head lists,
token lists, the CMR model, causal-tracing computations and the direct path of a head to the
logits. May import ``interp`` and ``circuits.data``, never a detector, a command or the atlas."""
