"""Configuration: defaults, .env, and one clear line with exit code 2 for bad values."""
import os
import subprocess
import sys

import pytest

from droid.config import ConfigError, keep_generated_secret, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_need_no_configuration():
    config = load_config({}, dotenv_path=None)
    assert (config.host, config.port, config.env) == ("0.0.0.0", 3000, "development")
    assert config.mongodb_uri is None and config.jwt_secret_generated
    assert len(config.jwt_secret) >= 32
    assert config.cors_origins == ("*",) and config.worker_concurrency == 4
    assert (config.task_max_retries, config.task_timeout_s, config.jwt_expires_in) == (2, 120.0, 3600)


def test_dotenv_is_read_and_the_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=4100\nLOG_LEVEL=debug\nCORS_ORIGIN=http://a.example, http://b.example/\n")
    config = load_config({"PORT": "4200"}, dotenv_path=str(env_file))
    assert config.port == 4200
    assert config.log_level == "DEBUG"
    assert config.cors_origins == ("http://a.example", "http://b.example")


def test_origins_are_kept_as_browsers_send_them():
    config = load_config({"CORS_ORIGIN": " HTTPS://App.Example.com/ ,http://localhost:5173,"},
                         dotenv_path=None)
    assert config.cors_origins == ("https://app.example.com", "http://localhost:5173")
    assert load_config({}, dotenv_path=None).cors_origins == ("*",)


def test_database_name_comes_from_the_uri_unless_given():
    assert load_config({"MONGODB_URI": "mongodb://h:27017/shop"}, dotenv_path=None).mongodb_db == "shop"
    assert load_config({"MONGODB_URI": "mongodb://h:27017/shop", "MONGODB_DB": "x"},
                       dotenv_path=None).mongodb_db == "x"
    assert load_config({"MONGODB_URI": "mongodb+srv://u:p@c.example.net/?retryWrites=true"},
                       dotenv_path=None).mongodb_db == "droid"


@pytest.mark.parametrize("env, name", [
    ({"PORT": "abc"}, "PORT"),
    ({"PORT": "70000"}, "PORT"),
    ({"MONGODB_URI": "postgres://x"}, "MONGODB_URI"),
    ({"MONGODB_URI": "mongodb://host:notaport"}, "MONGODB_URI"),
    ({"WORKER_CONCURRENCY": "-1"}, "WORKER_CONCURRENCY"),
    ({"TASK_TIMEOUT_S": "nan"}, "TASK_TIMEOUT_S"),
    ({"JWT_SECRET": "short"}, "JWT_SECRET"),
    ({"JWT_EXPIRES_IN": "0"}, "JWT_EXPIRES_IN"),
    ({"REDIS_URL": "http://x"}, "REDIS_URL"),
    ({"LLM_BASE_URL": "not a url"}, "LLM_BASE_URL"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"CORS_ORIGIN": "app.example.com"}, "CORS_ORIGIN"),  # no scheme: never a browser's Origin
    ({"CORS_ORIGIN": "https://a.example/app"}, "CORS_ORIGIN"),
    ({"CORS_ORIGIN": "https://a.example, ftp://b.example"}, "CORS_ORIGIN"),
    ({"CORS_ORIGIN": "https://a.example:99999"}, "CORS_ORIGIN"),
    ({"DROID_ENV": "staging"}, "DROID_ENV"),
    ({"DROID_ENV": "production"}, "MONGODB_URI"),
    ({"DROID_ENV": "production", "MONGODB_URI": "mongodb://h/db"}, "JWT_SECRET"),
    ({"DROID_MAX_CONNECTIONS": "0"}, "DROID_MAX_CONNECTIONS"),
    ({"DROID_ANON_SESSIONS_PER_ADDRESS": "many"}, "DROID_ANON_SESSIONS_PER_ADDRESS"),
    ({"DROID_ANON_SESSIONS": "-5"}, "DROID_ANON_SESSIONS"),
    ({"DROID_CONNECT_PACKET_TIMEOUT_S": "0"}, "DROID_CONNECT_PACKET_TIMEOUT_S"),
    ({"DROID_JOIN_TIMEOUT_S": "soon"}, "DROID_JOIN_TIMEOUT_S"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigError) as info:
        load_config(env, dotenv_path=None)
    assert name in str(info.value)


def _run(env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MONGODB", "JWT", "PORT"))}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "droid"], env=full, cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


def test_bad_port_stops_start_up_with_exit_code_2():
    result = _run({"PORT": "http"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PORT" in lines[0]


def test_production_without_database_refuses_to_start():
    result = _run({"DROID_ENV": "production"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "MONGODB_URI" in result.stderr


def test_the_generated_development_key_is_kept_in_the_data_folder(tmp_path):
    data = tmp_path / "data"
    first = keep_generated_secret(load_config({"DROID_DATA_DIR": str(data)}, dotenv_path=None))
    key_file = data / "jwt-secret"
    assert first.jwt_secret_kept == str(key_file)
    assert key_file.read_text().strip() == first.jwt_secret
    assert key_file.stat().st_mode & 0o777 == 0o600
    again = keep_generated_secret(load_config({"DROID_DATA_DIR": str(data)}, dotenv_path=None))
    assert again.jwt_secret == first.jwt_secret  # a restart signs nobody out


@pytest.mark.parametrize("env", [
    {"JWT_SECRET": "x" * 40},
    {"DROID_DATA_DIR": ":memory:"},
    {"MONGODB_URI": "mongodb://127.0.0.1:1"},
])
def test_no_key_is_kept_when_one_is_configured_or_nothing_persists(tmp_path, monkeypatch, env):
    monkeypatch.chdir(tmp_path)
    config = keep_generated_secret(load_config(env, dotenv_path=None))
    assert config.jwt_secret_kept is None
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_kept_key_stops_start_up(tmp_path):
    (tmp_path / "jwt-secret").write_text("short\n")
    with pytest.raises(ConfigError, match="jwt-secret"):
        keep_generated_secret(load_config({"DROID_DATA_DIR": str(tmp_path)}, dotenv_path=None))


def test_the_data_folder_names_the_sqlite_file():
    assert load_config({}, dotenv_path=None).sqlite_path == os.path.join("droid-data",
                                                                        "droid.sqlite3")
    assert load_config({"DROID_DATA_DIR": ":memory:"}, dotenv_path=None).sqlite_path == ":memory:"


@pytest.mark.parametrize("env, name", [
    ({"LLM_BASE_URL": "http://127.0.0.1:11434/v1"}, "LLM_MODEL"),
    ({"LLM_BASE_URL": "http://127.0.0.1:11434/v1", "LLM_MODEL": " "}, "LLM_MODEL"),
    ({"METRICS_TOKEN": "short"}, "METRICS_TOKEN"),
])
def test_llm_without_a_model_and_a_short_metrics_token_are_refused(env, name):
    with pytest.raises(ConfigError) as info:
        load_config(env, dotenv_path=None)
    assert name in str(info.value)


def test_llm_with_a_model_and_the_metrics_token_are_read():
    config = load_config({"LLM_BASE_URL": "http://127.0.0.1:11434/v1/", "LLM_MODEL": "llama3.2",
                          "METRICS_TOKEN": "m" * 32}, dotenv_path=None)
    assert (config.llm_base_url, config.llm_model) == ("http://127.0.0.1:11434/v1", "llama3.2")
    assert config.metrics_token == "m" * 32
    assert load_config({}, dotenv_path=None).metrics_token is None
