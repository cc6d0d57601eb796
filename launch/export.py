"""Exports a run's parameters with its model config: for fine-tuning, extract and infer,
or for the PyTorch side.

    python launch/export.py --workdir=/ckpt/as2m --output=exports/as2m [--step=N]
    python launch/export.py --workdir=exports/eat-ft --output=hf/eat-ft --format=hf
    python launch/export.py --workdir=/ckpt/as2m --output=asda_as2m.pt --format=fairseq
    python launch/export.py --workdir=/ckpt/as20k --output=serving/as20k --format=saved_model

``--workdir`` is a training run's workdir or an export. ``orbax`` (the default): a
pretraining run exports {encoder (the student), decoder, teacher}; a fine-tuning run
{encoder, fc_norm, head} with its input length, normalisation, score function and
class names (--labels, else its dataset's), as a plain Orbax tree plus ``model.json``
that restores onto any mesh or device count (finetune.init_from, launch/extract.py,
launch/infer.py, which then name the classes with no dataset or --labels at hand).
``hf``: a Hugging Face folder that transformers loads as it stands (``AutoModel`` or
``AutoModelForAudioClassification``, ``AutoFeatureExtractor``, ``pipeline``, with
``trust_remote_code=True``), either attention form: config.json (with the class names
of ``--labels`` or the run's dataset), model.safetensors (the student's encoder, and
the head of a classifier, in EAT's tensor names), the PyTorch code of the model and
its feature extractor, preprocessor_config.json and a model card. ``fairseq``:
the release's ``.pt`` (the dict the authors' feature_extract.py and inference.py read),
written with nothing pickled but tensors and plain containers (needs PyTorch); its
``cfg`` names the architecture, or is copied from a release checkpoint with
``--fairseq_cfg_from`` (fairseq rebuilds the model from that whole config).
``saved_model``: a TensorFlow SavedModel whose serving signature takes 16 kHz
waveforms and their lengths and returns a classifier's scores or an encoder's clip and
per-step embeddings, the front end inside (asda_jax/serving.py), lowered for
``--platforms`` (default cpu; cpu,tpu to serve on TPUs too).
docs/weights.md says what each holds.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import json
import sys

from absl import app, flags
from etils import epath

from asda_jax import checkpoints, cli, hf_weights, inference, report, storage

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's workdir, or an export.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("output", None, "A new (or empty) directory; a new .pt for fairseq.")
flags.DEFINE_enum("format", "orbax", ["orbax", "hf", "fairseq", "saved_model"], "What to write.")
flags.DEFINE_list("platforms", ["cpu"], "saved_model: the platforms it is lowered for (cpu, tpu).")
flags.DEFINE_string("labels", None, "Label CSV naming a classifier's classes (hf).")
flags.DEFINE_string(
    "fairseq_cfg_from", None, "A release .pt of the same architecture whose cfg to copy."
)
flags.mark_flags_as_required(["workdir", "output"])


def run_export(workdir: str, step: int | None):
    """(params, ModelConfig, description) of a run's checkpoint."""
    described = inference.describe(workdir)
    item, prefix = checkpoints.locate_params(workdir, step)
    params = checkpoints.restore_item(item, prefix)
    if described.kind == "pretrain":
        params["teacher"] = checkpoints.restore_item(item, ("teacher",))
    description = dict(
        source=str(item.parent), kind=described.kind,
        target_frames=described.input.target_frames, norm=described.input.norm,
        **(described.head or {}),
        **({"labels": described.input.labels} if described.input.labels else {}),
    )  # fmt: skip
    return params, described.model, description


def class_names(inputs: inference.ModelInput, classes: int) -> list[str] | None:
    """--labels, else what the run names its ``classes`` classes by; None where it
    names none."""
    try:
        return inference.class_names(dataclasses.replace(inputs, num_classes=classes), FLAGS.labels)
    except (ValueError, FileNotFoundError) as e:
        print(f"no class names ({e}); the folder names them 'class 0', 'class 1', ...")
        return None


def provenance(workdir: str, described, description: dict) -> hf_weights.Provenance:
    """What is known of the run: its task, dataset, step and evaluation."""
    step = epath.Path(description["source"]).name
    scores = storage.path(workdir) / report.EVAL_FILE
    return hf_weights.Provenance(
        task=description["kind"],
        dataset=described.input.dataset,
        steps=int(step) if step.isdigit() else None,
        evaluation=json.loads(scores.read_text()) if scores.is_file() else None,
    )


def hf_folder(output: str, params: dict, cfg, description: dict):
    """The run as a Hugging Face folder: its encoder (and head), class names and card."""
    kept = {k: v for k, v in params.items() if k in ("encoder", "fc_norm", "head")}
    described = inference.describe(FLAGS.workdir)
    head, names = None, None
    if "head" in kept:
        head = {k: description[k] for k in ("pooling", "scores")}
        names = class_names(described.input, int(kept["head"]["bias"].shape[0]))
    return hf_weights.export_model(
        output, kept, cfg, description["target_frames"], norm=description["norm"],
        head=head, names=names, provenance=provenance(FLAGS.workdir, described, description),
    )  # fmt: skip


def write(output: str, params: dict, cfg, description: dict):
    """Writes ``params`` to ``output`` in FLAGS.format (orbax, hf or fairseq); the path
    written."""
    if FLAGS.format == "orbax":
        if "head" in params:  # a classifier's export names its classes wherever it goes
            inputs = inference.describe(FLAGS.workdir).input
            names = class_names(inputs, int(params["head"]["bias"].shape[0]))
            description |= {"class_names": names} if names else {}
        return checkpoints.export(output, params, cfg, **description)
    if FLAGS.format == "hf":
        return hf_folder(output, params, cfg, description)
    from asda_jax import torch_import

    release_cfg = None
    if FLAGS.fairseq_cfg_from:
        release_cfg = torch_import.load_checkpoint(FLAGS.fairseq_cfg_from).get("cfg")
    return torch_import.write_release_checkpoint(output, params, cfg, release_cfg)


def main(argv):
    del argv
    try:
        if FLAGS.format == "saved_model":  # restores the run itself, in its own forms
            from asda_jax import serving

            kind = serving.export(FLAGS.workdir, FLAGS.output, FLAGS.step, tuple(FLAGS.platforms))
            print(f"wrote {FLAGS.output}: the {kind} of {FLAGS.workdir} as a SavedModel")
            return
        params, cfg, description = run_export(FLAGS.workdir, FLAGS.step)
        out = write(FLAGS.output, params, cfg, description)
    except (ValueError, FileExistsError, storage.MissingBucket) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}: {sorted(params)} from {description['source']}")


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
