"""Where `droid login` keeps the server's URL and the API key: `$XDG_CONFIG_HOME/droid/
config.json` (`~/.config/droid/config.json` without it), readable by the user alone (folder
0700, file 0600, written to a temporary file and renamed, so it is never half written)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"


class ConfigFileError(Exception):
    """The saved configuration cannot be read or written (one line, naming the file)."""


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "droid"


def config_path() -> Path:
    return config_dir() / CONFIG_FILE


def load() -> dict[str, Any]:
    """The saved settings ({} when there are none)."""
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigFileError(f"{path} is not valid JSON (droid logout removes it)") from None
    return data if isinstance(data, dict) else {}


def save(data: dict[str, Any]) -> Path:
    """Write the settings, for the user's eyes only; returns the file's path."""
    path = config_path()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{CONFIG_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask, or a leftover file, made of it
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=2)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def remove() -> bool:
    """Forget the saved settings; whether there were any."""
    path = config_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigFileError(f"cannot remove {path}: {exc.strerror or exc}") from None
    return True
