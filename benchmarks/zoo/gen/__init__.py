"""The generated scenario zoo: seeded scenario specs, one parametrised training script, labels
checked against ablated twins, and the scoring of vqdoctor's answers (see ../README.md).

Modules (none imports vqdoctor):

- `spec`: draws a scenario spec from a seed, splits seeds into tuning / held-out, ablates a spec
  into its fault-free twin (pure Python, no torch);
- `train`: the training script (`python gen/train.py --spec FILE --out DIR`), with `quantizers`
  (the real libraries' quantizers behind one handle), `handwritten` (taming / zalando /
  rosinality / neutral-name modules) and `reference` (measurements from the indices the
  quantizer returned, written to `reference.json`);
- `confirm`: checks each label against the reference measurements of the run and its twin;
- `score`: judges reports, Wilson intervals, the tables (held-out split: aggregates only);
- `runner`: runs the variants under `vqdoctor watch` / `inspect`, with caching and jobs.
"""
