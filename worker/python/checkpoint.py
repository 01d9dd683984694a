"""Converts between PyTorch checkpoints of the Endo-FM reference and endofm's safetensors files.

Run by `endofm-worker model import|export` with the project venv's torch (2.13.0). Keys keep the
published state-dict names; a `module.` prefix (DistributedDataParallel) is removed on import.

  import SRC.pth OUTDIR [--trust]   writes OUTDIR/student.safetensors, OUTDIR/teacher.safetensors
                                    (or OUTDIR/state_dict.safetensors for a bare state dict) and
                                    OUTDIR/import.json; prints that JSON
  export OUT.pth --student S.safetensors [--teacher T.safetensors] [--epoch E] [--student-prefix P]
                                    writes a pickle shaped like the reference's checkpoints
"""
import argparse
import json
import os
import sys


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def load_checkpoint(path, trust):
    import torch

    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    # Published checkpoints carry their argparse.Namespace; allow that one class, nothing else.
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure the same way
        fail(
            f"cannot read {path} as a weights-only PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); if you trust the file, pass --trust"
        )


def clean_state_dict(sd, what):
    import torch

    if not isinstance(sd, dict):
        fail(f"`{what}` is a {type(sd).__name__}, expected a state dict")
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            fail(f"`{what}` has a non-string key {k!r}")
        if not torch.is_tensor(v):
            fail(f"`{what}`[{k!r}] is a {type(v).__name__}, expected a tensor")
        key = k[len("module."):] if k.startswith("module.") else k
        if key in out:
            fail(f"`{what}` has key {key!r} both with and without the `module.` prefix")
        out[key] = v.detach().cpu().contiguous()
    if not out:
        fail(f"`{what}` is empty")
    return out


def cmd_import(args):
    from safetensors.torch import save_file

    ckpt = load_checkpoint(args.src, args.trust)
    if not isinstance(ckpt, dict):
        fail(f"{args.src} holds a {type(ckpt).__name__}, expected a dict")
    os.makedirs(args.outdir, exist_ok=True)
    written = {}
    nets = [n for n in ("student", "teacher") if n in ckpt]
    if nets:
        for name in nets:
            sd = clean_state_dict(ckpt[name], name)
            path = os.path.join(args.outdir, f"{name}.safetensors")
            save_file(sd, path)
            written[name] = {"path": path, "tensors": len(sd)}
    elif "state_dict" in ckpt or "model" in ckpt:
        key = "state_dict" if "state_dict" in ckpt else "model"
        sd = clean_state_dict(ckpt[key], key)
        path = os.path.join(args.outdir, "state_dict.safetensors")
        save_file(sd, path)
        written["state_dict"] = {"path": path, "tensors": len(sd)}
    else:
        sd = clean_state_dict(ckpt, "checkpoint")
        path = os.path.join(args.outdir, "state_dict.safetensors")
        save_file(sd, path)
        written["state_dict"] = {"path": path, "tensors": len(sd)}
    epoch = ckpt.get("epoch")
    report = {
        "source": os.path.abspath(args.src),
        "epoch": int(epoch) if isinstance(epoch, int) else None,
        "written": written,
        "other_entries": sorted(k for k in ckpt if k not in ("student", "teacher"))
        if nets
        else [],
    }
    with open(os.path.join(args.outdir, "import.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))


def cmd_export(args):
    import torch
    from safetensors.torch import load_file

    for p in filter(None, [args.student, args.teacher]):
        if not os.path.isfile(p):
            fail(f"{p} does not exist")
    student = load_file(args.student)
    teacher = load_file(args.teacher) if args.teacher else {k: v.clone() for k, v in student.items()}
    ckpt = {
        "student": {args.student_prefix + k: v for k, v in student.items()},
        "teacher": dict(teacher),
    }
    if args.epoch is not None:
        ckpt["epoch"] = args.epoch
    tmp = args.out + ".partial"
    torch.save(ckpt, tmp)
    os.replace(tmp, args.out)
    print(json.dumps({"out": os.path.abspath(args.out), "student": len(student), "teacher": len(teacher)}))


def main():
    p = argparse.ArgumentParser(prog="checkpoint.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("import")
    i.add_argument("src")
    i.add_argument("outdir")
    i.add_argument("--trust", action="store_true")
    e = sub.add_parser("export")
    e.add_argument("out")
    e.add_argument("--student", required=True)
    e.add_argument("--teacher")
    e.add_argument("--epoch", type=int)
    e.add_argument("--student-prefix", default="module.")
    args = p.parse_args()
    {"import": cmd_import, "export": cmd_export}[args.cmd](args)


if __name__ == "__main__":
    main()
