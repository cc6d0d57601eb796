"""Does pretraining learn from real recordings? Pretrain on ~15 h of real audio from
Debian's archive, then probe instrument families with one sound bank held out.

    python -m benchmarks.real_audio --work=/tmp/real_audio [--steps=3000] [--stages=...]

Stages, each timed and written to ``<work>/report.json`` (a stage whose output exists
is not redone; remove it to redo it):

  install   apt-get install --no-install-recommends the packages of CORPUS and BANKS
            (~870 MB; needs root and Debian's archive)
  corpus    <work>/corpus: every installed file of the CORPUS packages (music, speech,
            effects) linked in, ``.pk3`` archives unpacked; nothing from the sound banks;
            decoding decides what is audio (the rest is skipped and counted)
  banks     <work>/banks: the sampled notes of the three BANKS as WAV files, labelled
            by General MIDI family (benchmarks/sound_banks.py), with labels.csv
            (path,label,group = the bank); families with at least MIN_NOTES notes in
            every bank
  pretrain  configs/pretrain_small_corpus.py on the corpus (``--steps`` updates)
  demo      configs/demo.py (the synthetic-pretrained demo encoder)
  probe     balanced accuracy of ridge probes, one bank held out per fold, for every
            pretraining checkpoint's student and EMA teacher (mean-pooled patch
            outputs; the last one's CLS too), the same encoder at random init, log-mel
            statistics and the demo encoder (asda_jax/file_probe.py); beside it each
            feature set's score with the banks mixed (5 folds) and its effective rank
            (a collapse check); tables printed and saved

The machine's CPU (``lscpu``) is recorded with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import soundfile as sf

from asda_jax.data import builders

ROOT = Path(__file__).resolve().parent.parent
CORPUS = {
    "music": (
        "warzone2100-music", "wesnoth-1.16-music", "nexuiz-music", "singularity-music",
        "hyperrogue-music", "asterisk-moh-opsound-wav",
    ),
    "speech": (
        "asterisk-core-sounds-en-wav", "asterisk-core-sounds-es-wav",
        "asterisk-core-sounds-fr-wav", "asterisk-core-sounds-it-wav",
        "asterisk-core-sounds-ru-wav", "klettres-data", "ktuberling-data",
    ),
    "effects": ("colobot-common-sounds", "ufoai-sound", "wordwarvi-sound"),
}  # fmt: skip
BANKS = {
    "fluidr3": ("fluid-soundfont-gm", "/usr/share/sounds/sf2/FluidR3_GM.sf2"),
    "timgm6mb": ("timgm6mb-soundfont", "/usr/share/sounds/sf2/TimGM6mb.sf2"),
    "freepats": ("freepats", "/usr/share/midi/freepats/Tone_000"),
}
MIN_NOTES = 10
# Package files that are never sound: documentation, icons, translations, menus.
NOT_SOUND = ("/usr/share/doc/", "/usr/share/icons/", "/usr/share/man/", "/usr/share/locale/",
             "/usr/share/metainfo/", "/usr/share/applications/", "/usr/share/pixmaps/",
             "/usr/share/help/", "/usr/share/config.kcfg/", "/usr/share/mime/")  # fmt: skip
STAGES = ("install", "corpus", "banks", "pretrain", "demo", "probe")


def packages() -> list[str]:
    return [p for group in CORPUS.values() for p in group] + [p for p, _ in BANKS.values()]


def installed(package: str) -> bool:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return done.returncode == 0 and "install ok installed" in done.stdout


def stage_install(work: Path, args) -> dict:
    missing = [p for p in packages() if not installed(p)]
    if missing:
        command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return {"packages": packages(), "installed_now": missing}


def package_files(package: str) -> list[Path]:
    listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    paths = [Path(line) for line in listed.stdout.splitlines() if line.startswith("/usr/share/")]
    return [p for p in paths if not str(p).startswith(NOT_SOUND) and p.is_file()]


def stage_corpus(work: Path, args) -> dict:
    corpus = work / "corpus"
    staging = work / "corpus.partial"
    shutil.rmtree(staging, ignore_errors=True)
    counts = {}
    for kind, group in CORPUS.items():
        for package in group:
            files = package_files(package)
            for path in files:
                target = staging / kind / package / path.relative_to("/usr/share")
                target.parent.mkdir(parents=True, exist_ok=True)
                if path.suffix == ".pk3":  # a zip of the game's sounds
                    with zipfile.ZipFile(path) as archive:
                        archive.extractall(target.with_suffix(""))
                else:
                    target.symlink_to(path)
            counts[package] = len(files)
    staging.rename(corpus)
    seconds = sum(builders.file_seconds(p) or 0.0 for p in corpus.rglob("*") if p.is_file())
    return {"files_per_package": counts, "decodable_hours": round(seconds / 3600, 2)}


def stage_banks(work: Path, args) -> dict:
    from benchmarks import sound_banks

    notes = {
        "fluidr3": sound_banks.sf2_notes(BANKS["fluidr3"][1]),
        "timgm6mb": sound_banks.sf2_notes(BANKS["timgm6mb"][1]),
        "freepats": sound_banks.patch_folder_notes(BANKS["freepats"][1]),
    }
    per_bank = {bank: {f: sum(n.family == f for n in ns) for f in sound_banks.FAMILIES}
                for bank, ns in notes.items()}  # fmt: skip
    families = [f for f in sound_banks.FAMILIES
                if all(counts[f] >= MIN_NOTES for counts in per_bank.values())]  # fmt: skip
    banks, staging = work / "banks", work / "banks.partial"
    shutil.rmtree(staging, ignore_errors=True)
    rows = []
    for bank, bank_notes in notes.items():
        for note in bank_notes:
            if note.family not in families:
                continue
            relative = Path(bank) / note.family / f"{note.name}.wav"
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            sf.write(staging / relative, note.wave, note.rate, subtype="PCM_16")
            rows.append(f"{relative},{note.family},{bank}")
    (staging / "labels.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    staging.rename(banks)
    return {
        "families": families,
        "notes": {bank: {f: per_bank[bank][f] for f in families} for bank in notes},
        "total": len(rows),
    }


def train(config: str, workdir: Path, *overrides: str) -> None:
    command = [sys.executable, "launch/train.py", f"--config={config}", f"--workdir={workdir}",
               *overrides]  # fmt: skip
    with open(workdir.parent / f"{workdir.name}.log", "w") as log:
        subprocess.run(command, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)


def stage_pretrain(work: Path, args) -> dict:
    arg = f"source={work / 'corpus'},data_dir={work / 'data'},steps={args.steps}"
    train(f"configs/pretrain_small_corpus.py:{arg}", work / "pretrain")
    return losses_summary(work / "pretrain")


def stage_demo(work: Path, args) -> dict:
    train("configs/demo.py", work / "demo", f"--config.data.data_dir={work / 'data'}")
    return losses_summary(work / "demo")


def losses_summary(workdir: Path) -> dict:
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [(m["step"], m["loss"]) for m in logged if "loss" in m]
    return {"first_loss": losses[0], "last_loss": losses[-1], "logged": len(losses)}


def stage_probe(work: Path, args) -> dict:
    from asda_jax import file_probe, inference

    listed = file_probe.read_labelled_folder(work / "banks")
    waves, kept, skipped = file_probe.read_waves(listed)
    files = [listed[i] for i in kept]
    folds = file_probe.held_out_folds(files)
    features = {"log-mel statistics": file_probe.logmel_statistics(waves)}
    steps = file_probe.checkpoint_steps(work / "pretrain")
    for step in steps:
        for which in ("encoder", "teacher"):
            encoder = inference.load_encoder(work / "pretrain", step, which)
            name = f"pretrained {which}, step {step}"
            features[name] = file_probe.encoder_features(encoder, waves)
            if step == steps[-1]:
                cls = file_probe.encoder_features(encoder, waves, pooling="cls")
                features[f"{name}, CLS"] = cls
    random = inference.random_encoder(work / "pretrain")
    features["random init"] = file_probe.encoder_features(random, waves)
    demo = inference.load_encoder(work / "demo")
    features["demo encoder (synthetic)"] = file_probe.encoder_features(demo, waves)
    results = {name: file_probe.run(x, files, folds) for name, x in features.items()}
    # The same probes with the banks mixed (5 folds per family): what held-out banks
    # cost each feature set, i.e. how much of its score recognised the bank.
    pooled = [dataclasses.replace(f, group="") for f in files]
    mixed_folds = file_probe.held_out_folds(pooled, k=5)
    mixed = {name: file_probe.run(x, pooled, mixed_folds).mean for name, x in features.items()}
    ranks = {name: file_probe.effective_rank(x) for name, x in features.items()}
    table = file_probe.table(results, [f.name for f in folds])
    lines = ["| features | banks mixed (5 folds) | effective rank |", "|---|---|---|"]
    lines += [f"| {name} | {mixed[name]:.3f} | {ranks[name]:.1f} |" for name in features]
    print(table + "\n\n" + "\n".join(lines))
    (work / "probe_table.md").write_text(table + "\n\n" + "\n".join(lines) + "\n")
    return {
        "files": len(files),
        "skipped": dict(skipped),
        "results": {name: r.as_dict() for name, r in results.items()},
        "banks_mixed": mixed,
        "effective_rank": ranks,
    }


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args()
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    args.work.mkdir(parents=True, exist_ok=True)
    report_path = args.work / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["cpu"] = cpu_model()
    outputs = {"corpus": "corpus", "banks": "banks", "pretrain": "pretrain", "demo": "demo"}
    for stage in (s for s in STAGES if s in stages):
        if stage in outputs and (args.work / outputs[stage]).exists():
            print(f"{stage}: {args.work / outputs[stage]} exists, kept", flush=True)
            continue
        print(f"{stage} ...", flush=True)
        started = time.perf_counter()
        result = globals()[f"stage_{stage}"](args.work, args)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        report[stage] = result
        report_path.write_text(json.dumps(report, indent=1, default=str))
        print(f"{stage}: {json.dumps(result, default=str)[:2000]}", flush=True)


if __name__ == "__main__":
    main()
