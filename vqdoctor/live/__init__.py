"""Live watching of a training: hooks on the quantizers, the step clock, the run directory.

`vqdoctor.watch(model)` (`live.doctor.watch`) returns a `Doctor`. The parts, each in its module:
`discovery` (which submodules are quantizers, and how to read them), `recorder` (attaches the
hooks, keeps the step clock, flushes) over `probe` (what is measured on one quantizer, on the
device), `arena` (the device slot buffers), `outputs` (where a forward's indices, input and
output are) and `flush` (host arrays -> records); `store` (the run directory: writer and the one
reader, `StoreTail`), `follow` (the live alerts of a run being recorded), `launcher` and `_boot`
(`vqdoctor watch -- CMD`, zero-code attach), `alerts`.

Nothing is imported here: `vqdoctor report RUN_DIR` and the other store readers do not pay for
importing torch.
"""
