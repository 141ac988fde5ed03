"""Where users already work: exporters to TensorBoard / W&B and callbacks for Lightning and
Hugging Face `Trainer`, all thin layers over the one watch core (`vqdoctor.live.doctor.Doctor`).

- `vqdoctor.integrations.export`: `TensorBoardExporter`, `WandbExporter` (fed by the Doctor's
  `on_flush` records, so they never add a host synchronisation between flushes);
- `vqdoctor.integrations.lightning.VQDoctorCallback`: a `lightning.pytorch` callback;
- `vqdoctor.integrations.transformers.VQDoctorCallback`: a `transformers.TrainerCallback`.

Each integration's own package is an optional extra, imported only by its module.
Details: docs/integrations.md.
"""
