"""`make fuzz`: atheris over the code that reads what strangers send (see fuzz_targets).

    python -m tandem.tools.fuzz [TARGET ...] [--seconds 120]

Each target takes one serialized protobuf message. Half of the mutations are libFuzzer's own
byte mutations; the other half parse the input as the target's message, change one field to a
value chosen to hurt (int limits, NaN, empty and long strings, many repeated entries), and
serialize it again, so the fuzzer also reaches inputs past the parser. libFuzzer's working
corpus lives under .fuzz/ (not kept); an input that fails is written to
tests/fuzz/corpus/<target>/, which `make test` replays (tests/test_fuzz_corpus.py).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

REPO = Path(__file__).resolve().parents[3]
CORPUS = REPO / "tests" / "fuzz" / "corpus"
WORK = REPO / ".fuzz"

F = FieldDescriptor
INT_RANGES = {
    F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1), F.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
    F.TYPE_ENUM: (-2**31, 2**31 - 1),
}
INTS = [0, 1, 2, 3, 7, 64, 1000, 2**16, 2**20, 2**24, 2**30, 2**31 - 1, 2**32 - 1, 2**63 - 1, -1, -2**31, -2**63]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-6, 1e-45, 2.0, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]
STRINGS = ["", "a", "\x00", "é東🙂", "float32", "bfloat16", "int64", "bool", "x" * 4096]


def mutate_message(message: Message, rng: random.Random) -> None:
    """Change one field of `message` (or of a message inside it) to a hostile value."""
    fields = message.DESCRIPTOR.fields
    if not fields:
        return
    field = rng.choice(fields)
    value = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, item = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        for _ in range(rng.choice([1, 1, 2, 1000])):
            value[_scalar(key, rng)] = _scalar(item, rng)
    elif field.is_repeated:
        if field.message_type is not None:
            if value and rng.random() < 0.5:
                mutate_message(rng.choice(value), rng)
            else:
                value.add()
        elif value and rng.random() < 0.4:
            index = rng.randrange(len(value))
            if rng.random() < 0.5:
                del value[index]
            else:
                value[index] = _scalar(field, rng)
        else:
            value.extend(_scalar(field, rng) for _ in range(rng.choice([1, 1, 2, 3, 64, 5000])))
    elif field.message_type is not None:
        if rng.random() < 0.1:
            message.ClearField(field.name)
        else:
            mutate_message(value, rng)
            value.SetInParent()
    else:
        setattr(message, field.name, _scalar(field, rng))


def _scalar(field: FieldDescriptor, rng: random.Random):
    if field.type in INT_RANGES:
        low, high = INT_RANGES[field.type]
        values = [v for v in INTS if low <= v <= high]
        return rng.choice([*values, low, high, rng.randint(low, high), rng.randint(0, 300)])
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return rng.choice([*FLOATS, rng.uniform(-3, 3)])
    if field.type == F.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type == F.TYPE_STRING:
        return rng.choice([*STRINGS, "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(1, 40)))])
    if field.type == F.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 3, 4, 8, 64, 72 * 4, 72 * 8, 331 * 4, 4096]))
    raise TypeError(f"no values for field {field.full_name} of type {field.type}")


def structured_mutator(message_type: type[Message]):
    """A libFuzzer custom mutator that mutates bytes half of the time and fields the other half."""
    import atheris

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        message = message_type()
        try:
            message.ParseFromString(data)
        except DecodeError:
            pass
        for _ in range(rng.choice([1, 1, 2, 4])):
            mutate_message(message, rng)
        out = message.SerializeToString()
        return out if len(out) <= max_size else atheris.Mutate(data, max_size)

    return mutate


def run(name: str, seconds: int, libfuzzer_args: list[str]) -> int:
    """Fuzz one target for `seconds` in a child process; its failing input lands in the corpus."""
    import subprocess

    crashes, work = CORPUS / name, WORK / name
    crashes.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "tandem.tools.fuzz", "--child", name, str(work), str(crashes),
            f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=3072", "-max_len=65536",
            f"-artifact_prefix={crashes}/", "-print_final_stats=1", *libfuzzer_args]
    print(f"fuzz {name}: {seconds} s", flush=True)
    return subprocess.call(args)


def child(argv: list[str]) -> None:
    import atheris

    logging.disable(logging.WARNING)  # skipped rows and unsubscribed batches are expected here
    with atheris.instrument_imports(include=["tandem"]):  # setup() imports the services' modules
        from tandem.tools.fuzz_targets import TARGETS

        target = TARGETS[argv[0]]
        target.setup()
    atheris.Setup([sys.argv[0], *argv[1:]], target.one_input, custom_mutator=structured_mutator(target.message))
    atheris.Fuzz()


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    from tandem.tools.fuzz_targets import TARGETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help=f"targets to fuzz, of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=int, default=120, help="how long to fuzz each target")
    args, libfuzzer_args = parser.parse_known_args()
    unknown = set(args.targets) - TARGETS.keys()
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
    failed = [name for name in args.targets or TARGETS if run(name, args.seconds, libfuzzer_args) != 0]
    if failed:
        sys.exit(f"fuzz: {', '.join(failed)} failed; the inputs are in {CORPUS}/<target>/")


if __name__ == "__main__":
    main()
