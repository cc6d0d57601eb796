"""Recorded instrument notes read out of General MIDI sound banks, without a synthesiser.

A sound bank stores each instrument as sampled notes (real recordings of one note of
one instrument, for most of them) and maps the 128 General MIDI programs onto them.
Programs come in 16 families of eight (pianos 0-7, chromatic percussion 8-15, ...), so
every stored sample of a melodic program is a labelled recording: its family. Two file
formats hold them:

- SoundFont 2 (``.sf2``, RIFF): the samples are one 16-bit array (``sdta/smpl``);
  presets (program, bank) → preset zones → instruments → instrument zones → sample
  headers (start, end, loop, rate) in ``pdta``.
- Gravis UltraSound patches (``.pat``, one program per file, freepats): a 239-byte
  header, then per note a 96-byte wave header and its 8- or 16-bit samples.

A note is read as stored; a looped note shorter than ``NOTE_SECONDS`` has its loop
repeated up to that length (what a player does while the key is held), and every note
is cut at ``NOTE_SECONDS``. A sample that serves programs of two families is left out
(its label is ambiguous), as are drum kits (bank 128) and ROM samples.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FAMILIES = (
    "piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble",
    "brass", "reed", "pipe", "synth_lead", "synth_pad", "synth_effects", "ethnic",
    "percussive", "sound_effects",
)  # fmt: skip
NOTE_SECONDS = 3.0


@dataclasses.dataclass(frozen=True)
class Note:
    name: str  # unique within its bank
    program: int  # General MIDI program, 0-127
    wave: np.ndarray  # float32 in [-1, 1]
    rate: int

    @property
    def family(self) -> str:
        return FAMILIES[self.program // 8]


def held(wave: np.ndarray, loop: tuple[int, int] | None, length: int) -> np.ndarray:
    """``wave`` cut at ``length`` samples; a looped one shorter than that first extended
    by repeating ``loop`` (start, end) as a held key does."""
    if loop is not None and wave.size < length:
        start, end = loop
        if 0 <= start < end <= wave.size:
            repeats = -(-(length - start) // (end - start))
            wave = np.concatenate([wave[:start], np.tile(wave[start:end], repeats)])
    return wave[:length]


# ---------------------------------------------------------------------------- SoundFont 2


def riff_chunks(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(id, data start, data end) of the chunks between ``start`` and ``end``."""
    at = start
    while at + 8 <= end:
        cid, size = struct.unpack_from("<4sI", data, at)
        yield cid, at + 8, at + 8 + size
        at += 8 + size + (size & 1)


def sf2_parts(data: bytes) -> tuple[bytes | memoryview, dict[bytes, bytes]]:
    """(16-bit sample data, the pdta sub-chunks by id) of a SoundFont 2 file."""
    if data[:4] != b"RIFF" or data[8:12] != b"sfbk":
        raise ValueError("not a SoundFont 2 file (no RIFF sfbk header)")
    samples, tables = b"", {}
    for cid, s, e in riff_chunks(data, 12, len(data)):
        if cid != b"LIST":
            continue
        kind = data[s : s + 4]
        for sub, ss, se in riff_chunks(data, s + 4, e):
            if kind == b"sdta" and sub == b"smpl":
                samples = memoryview(data)[ss:se]
            elif kind == b"pdta":
                tables[sub] = data[ss:se]
    return samples, tables


def records(table: bytes, fmt: str) -> list[tuple]:
    """A pdta table as tuples; its last record is the format's terminal one (dropped)."""
    size = struct.calcsize(fmt)
    return [struct.unpack_from(fmt, table, at) for at in range(0, len(table) - size, size)]


GEN_INSTRUMENT, GEN_SAMPLE_ID = 41, 53
SAMPLE_MONO, SAMPLE_LEFT, SAMPLE_ROM = 1, 4, 0x8000


def zone_targets(bags: list[tuple], gens: list[tuple], first: int, last: int, op: int):
    """The ``op`` generator's values in the zones ``first``..``last`` (bag indices)."""
    found = []
    for bag in range(first, last):
        gen_end = bags[bag + 1][0] if bag + 1 < len(bags) else len(gens)
        found += [amount for oper, amount in gens[bags[bag][0] : gen_end] if oper == op]
    return found


def sf2_notes(path: str | Path, bank: int = 0) -> list[Note]:
    """The notes of a SoundFont's melodic bank: one per sample that serves programs of
    a single family (mono or left channel; a stereo pair's right half repeats it)."""
    data = Path(path).read_bytes()
    pcm, t = sf2_parts(data)
    samples = np.frombuffer(pcm, "<i2")
    presets = records(t[b"phdr"] + bytes(38), "<20sHHHIII")
    instruments = records(t[b"inst"] + bytes(22), "<20sH")
    pbag, pgen = records(t[b"pbag"], "<HH"), records(t[b"pgen"], "<HH")
    ibag, igen = records(t[b"ibag"], "<HH"), records(t[b"igen"], "<HH")
    headers = records(t[b"shdr"] + bytes(46), "<20sIIIIIBbHH")
    programs_of: dict[int, set[int]] = {}
    for i, (_, program, preset_bank, first_bag, *_) in enumerate(presets[:-1]):
        if preset_bank != bank:
            continue
        for inst in zone_targets(pbag, pgen, first_bag, presets[i + 1][3], GEN_INSTRUMENT):
            first, last = instruments[inst][1], instruments[inst + 1][1]
            for sample in zone_targets(ibag, igen, first, last, GEN_SAMPLE_ID):
                programs_of.setdefault(sample, set()).add(program)
    notes = []
    for sample, programs in sorted(programs_of.items()):
        name, start, end, loop_start, loop_end, rate, *_, kind = headers[sample]
        if len({p // 8 for p in programs}) != 1 or kind & SAMPLE_ROM:
            continue
        if kind not in (SAMPLE_MONO, SAMPLE_LEFT) or rate <= 0 or end <= start:
            continue
        wave = samples[start:end].astype(np.float32) / 32768.0
        loop = (loop_start - start, loop_end - start)
        label = name.split(b"\0")[0].decode("latin-1").strip()
        length = round(NOTE_SECONDS * rate)
        notes.append(Note(f"{sample:04d}_{label}", min(programs), held(wave, loop, length), rate))
    return notes


# ---------------------------------------------------------------------------- GUS patches

PAT_MAGIC = (b"GF1PATCH110\0", b"GF1PATCH100\0")
PAT_HEADER_BYTES = 239  # file 129 + instrument 63 + layer 47
WAVE_HEADER = struct.Struct("<7sBiiiHiiihB6s6sBBBBBBBhH36s")
MODE_16BIT, MODE_UNSIGNED, MODE_LOOP = 1, 2, 4


def pat_notes(path: str | Path, program: int) -> list[Note]:
    """The notes (waves) of one GUS patch file, labelled with ``program``."""
    data = Path(path).read_bytes()
    if data[:12] not in PAT_MAGIC:
        raise ValueError(f"{path}: not a GUS patch (no GF1PATCH header)")
    (waves,) = struct.unpack_from("<H", data, 85)
    at, notes = PAT_HEADER_BYTES, []
    for k in range(waves):
        fields = WAVE_HEADER.unpack_from(data, at)
        size, loop_start, loop_end, rate = fields[2:6]
        modes = fields[19]
        raw = data[at + WAVE_HEADER.size : at + WAVE_HEADER.size + size]
        at += WAVE_HEADER.size + size
        wide = bool(modes & MODE_16BIT)
        kind = ("<u2" if wide else "u1") if modes & MODE_UNSIGNED else ("<i2" if wide else "i1")
        values = np.frombuffer(raw[: len(raw) // (2 if wide else 1) * (2 if wide else 1)], kind)
        full = 32768.0 if wide else 128.0
        wave = values.astype(np.float32) - (full if modes & MODE_UNSIGNED else 0.0)
        width = 2 if wide else 1
        loop = (loop_start // width, loop_end // width) if modes & MODE_LOOP else None
        name = f"{Path(path).stem}_{k:02d}"
        notes.append(Note(name, program, held(wave / full, loop, round(NOTE_SECONDS * rate)), rate))
    return notes


def patch_folder_notes(folder: str | Path) -> list[Note]:
    """The notes of every ``NNN_Name.pat`` of a freepats-style folder (NNN: program)."""
    notes = []
    for path in sorted(Path(folder).glob("*.pat")):
        match = re.match(r"(\d{3})_", path.name)
        if match:
            notes += pat_notes(path, int(match.group(1)))
    return notes
