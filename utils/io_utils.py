"""Writing outputs so that a crash never leaves a file or folder that looks complete."""

import json
import os
import shutil
import tempfile


def write_text(path: str, text: str) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False))


def publish_outputs(output_dir: str, write_files, scratch_parent: str | None = None) -> None:
    """write_files(scratch) fills a scratch folder (in scratch_parent, default output_dir, on the same
    file system); its files then move into output_dir at once."""
    for folder in (output_dir, scratch_parent or output_dir):
        os.makedirs(folder, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".incomplete-", dir=scratch_parent or output_dir)
    try:
        write_files(scratch)
        for name in sorted(os.listdir(scratch)):
            os.replace(os.path.join(scratch, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def replace_folder(output_dir: str, build) -> None:
    """build(scratch) fills a scratch folder beside output_dir, which then takes its place (an old
    folder is kept until the new one is in place)."""
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    old = scratch + ".old"
    try:
        build(scratch)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(scratch, 0o777 & ~umask)  # mkdtemp makes it owner-only
        if os.path.exists(output_dir):
            os.rename(output_dir, old)
        os.rename(scratch, output_dir)
    except BaseException:
        if os.path.exists(old) and not os.path.exists(output_dir):
            os.rename(old, output_dir)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
