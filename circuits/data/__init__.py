"""The data sets the detectors run on (known facts, needles and haystacks, knowledge conflicts,
natural text, MemoTrap), each file beside the loader that reads and checks it. May import
``interp`` only."""
