"""``flowyard queue`` through the real CLI in subprocesses, against a fresh state database."""

from __future__ import annotations

import json
import os

import pytest

from deployments.agents_demo import agent_queue_demo_parameters
from flows.agent_queue_controls import agent_task_create
from flows.run_agent_queue import run_agent_queue
from tasks import agent_queue as queue
from tasks.agent_process import templates_from
from tasks.db import connection
from tasks.errors import LINE_LIMIT, UserError, control_character
from tasks.state import state_url
from tests.conftest import ROOT, run_cli
from tests.fs_support import fill_up, immutable, small_tmpfs


@pytest.fixture()
def env(fresh_db: str) -> dict[str, str]:
    state_url(fresh_db)
    return {"FLOWYARD_DATABASE_URL": fresh_db}


def _ok(*args: str, env: dict[str, str]) -> str:
    result = run_cli("queue", *args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _user_error(*args: str, env: dict[str, str]) -> str:
    result = run_cli("queue", *args, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    return result.stderr


@pytest.mark.usefixtures("prefect_api")
def test_create_list_run_metrics_cancel_retry(env: dict[str, str], tmp_path) -> None:
    first = int(_ok("create", "first", "--priority", "high", "--payload", '{"steps": 2}', env=env))
    second = int(_ok("create", "second", "--after", str(first), env=env))
    draft = int(_ok("create", "later", "--draft", env=env))
    listing = _ok("list", env=env)
    assert f"{second:>5}  pending" in listing and f"{draft:>5}  draft" in listing
    out = _ok("run", "--max-agents", "2", "--output-dir", str(tmp_path), env=env)
    assert f"task {first}: completed" in out and f"task {second}: completed" in out
    assert (tmp_path / "logs" / f"{first}.jsonl").exists()
    metrics = _ok("metrics", env=env)
    assert "reference" in metrics and "0.0%" in metrics
    _ok("cancel", str(draft), env=env)
    assert f"{draft:>5}  cancelled" in _ok("list", "--status", "cancelled", env=env)
    # a cancelled draft went back as pending, and ran without anyone submitting it
    assert _ok("retry", str(draft), env=env) == (
        f"task {draft} is a draft again, as it was when cancelled; `flowyard queue submit {draft}` releases it\n"
    )
    assert f"{draft:>5}  draft" in _ok("list", env=env)
    _ok("submit", str(draft), env=env)
    _ok("cancel", str(draft), env=env)  # cancelled while pending: pending again
    assert _ok("retry", str(draft), env=env) == f"task {draft} is pending again\n"


@pytest.mark.usefixtures("prefect_api")
def test_a_task_in_review_is_reported_so_by_the_run_and_redone_when_cancelled_and_retried(
    env: dict[str, str], tmp_path
) -> None:
    """The run said "completed", as if the task's dependents could run now."""
    reviewed = int(_ok("create", "design", "--review", env=env))
    in_review = f"task {reviewed}: completed, in review (approve it with `flowyard queue approve {reviewed}`)\n"
    assert _ok("run", "--output-dir", str(tmp_path), env=env) == in_review
    assert f"{reviewed:>5}  review" in _ok("list", env=env)
    _ok("cancel", str(reviewed), env=env)  # the result is rejected
    assert _ok("retry", str(reviewed), env=env) == f"task {reviewed} is pending again\n"
    assert _ok("run", "--output-dir", str(tmp_path), env=env) == in_review, "its agent ran again"
    assert queue.get_task(state_url(env["FLOWYARD_DATABASE_URL"]), reviewed).attempts == 2
    assert _ok("approve", str(reviewed), env=env) == f"task {reviewed} completed\n"

@pytest.mark.usefixtures("prefect_api")
def test_run_exits_non_zero_when_a_task_fails(env: dict[str, str], tmp_path) -> None:
    """A script draining the queue must see failures: exit 1, one line naming the tasks and
    where their logs are (the run's logs directory, not a placeholder to look up)."""
    failing = int(_ok("create", "doomed", "--payload", '{"fail": "disk full"}', env=env))
    dependent = int(_ok("create", "after it", "--after", str(failing), env=env))
    fine = int(_ok("create", "independent", env=env))
    result = run_cli("queue", "run", "--output-dir", str(tmp_path), env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"task {failing}: failed" in result.stdout and f"task {fine}: completed" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        f"flowyard: 1 task(s) failed ({failing}); 1 blocked by a failed dependency ({dependent}):"
        f" see {tmp_path / 'logs'}/<task id>.jsonl, fix the cause, then 'flowyard queue retry ID'"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("prefect_api")
def test_run_says_which_tasks_a_cancelled_dependency_blocks_not_a_failed_one(env: dict[str, str], tmp_path) -> None:
    """The exit line called every blocked task "blocked by a failed dependency", also one whose
    dependency was cancelled (its reason in `queue list` says "is cancelled"); a task behind a
    chain counts by the dependency at the chain's end, and one behind both by the failed one."""
    cancelled = int(_ok("create", "dropped", env=env))
    _ok("cancel", str(cancelled), env=env)
    after_cancel = int(_ok("create", "after dropped", "--after", str(cancelled), env=env))
    chain = int(_ok("create", "after that", "--after", str(after_cancel), env=env))
    result = run_cli("queue", "run", "--output-dir", str(tmp_path), env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines()[-1] == (
        f"flowyard: 2 blocked by a cancelled dependency ({after_cancel}, {chain}): "
        "'flowyard queue retry ID' the cancelled dependency, or cancel the tasks that need it"
    )
    failing = int(_ok("create", "doomed", "--payload", '{"fail": "disk full"}', env=env))
    after_both = int(_ok("create", "after both", "--after", str(failing), "--after", str(cancelled), env=env))
    result = run_cli("queue", "run", "--output-dir", str(tmp_path), env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines()[-1] == (
        f"flowyard: 1 task(s) failed ({failing}); 1 blocked by a failed dependency ({after_both}); "
        f"2 blocked by a cancelled dependency ({after_cancel}, {chain}): see {tmp_path / 'logs'}/<task id>.jsonl, "
        "fix the cause, then 'flowyard queue retry ID'"
    )


def test_user_errors_are_one_line(env: dict[str, str]) -> None:
    assert "unknown priority 'urgent'" in _user_error("create", "x", "--priority", "urgent", env=env)
    # the task has no id yet: the message said "of task 0"
    outside = _user_error("create", "x", "--workdir", "../../etc", env=env)
    assert outside.startswith("flowyard: error: working directory '../../etc' resolves to ")
    assert "outside the agent output directory" in outside
    shared = _user_error("create", "x", "--workdir", ".", env=env)
    assert shared.startswith("flowyard: error: working directory '.' resolves to ")
    assert ", the agent output directory itself, which all tasks share; give the task" in shared
    assert "logs/mine, in the agents' logs directory " in _user_error("create", "x", "--workdir", "logs/mine", env=env)
    assert "the agent type of task 'x' is empty" in _user_error("create", "x", "--agent-type", " ", env=env)
    assert "the agent type of task 'x' has 64 characters; at most 63 are accepted" in _user_error(
        "create", "x", "--agent-type", "c" * 64, env=env
    )
    assert "--payload is not valid JSON" in _user_error("create", "x", "--payload", "{nope", env=env)
    assert "payload of task 'x' contains a NUL character" in _user_error(
        "create", "x", "--payload", '{"a": ["\\u0000"]}', env=env
    )
    assert "--payload is not valid JSON (NaN is not a JSON number)" in _user_error(
        "create", "x", "--payload", '{"a": NaN}', env=env
    )
    assert "payload of task 'x' holds NaN, Infinity or a number beyond" in _user_error(
        "create", "x", "--payload", '{"a": [1e999]}', env=env
    )
    assert "unknown dependency" in _user_error("create", "x", "--after", "99999", env=env)
    assert "no agent task 424242" in _user_error("retry", "424242", env=env)
    done = int(_ok("create", "y", env=env))
    _ok("cancel", str(done), env=env)
    assert f"cannot cancel task {done}: it is cancelled" in _user_error("cancel", str(done), env=env)
    assert "the agent timeout (--timeout / timeout_seconds) -5.0 is out of range; give 1 to 31536000 seconds" in _user_error(
        "run", "--timeout", "-5", env=env
    )
    assert "the grace period (--grace / grace_seconds) -1.0 is out of range; give 0 to 31536000 seconds" in _user_error(
        "run", "--grace", "-1", env=env
    )
    assert "the lease must be at least 15 seconds (3 heartbeats of 5 s), not 10" in _user_error(
        "run", "--lease", "10", env=env
    )
    assert queue.get_task(state_url(env["FLOWYARD_DATABASE_URL"]), done).status == "cancelled"


def test_a_task_id_below_1_is_one_line_for_every_command_taking_one() -> None:
    """Click read a negative id as an option: `queue cancel -1` said 'No such option: -1'. Said
    without connecting: the URL here refuses every connection."""
    env = {"FLOWYARD_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    url = env["FLOWYARD_DATABASE_URL"]
    for args in (("cancel", "-1"), ("retry", "-12"), ("submit", "0"), ("approve", "-d", url, "-3")):
        assert _user_error(*args, env=env).strip() == (
            f"flowyard: error: no agent task {int(args[-1])}: task ids are positive integers; "
            "list tasks with `flowyard queue list`"
        )
    assert "No such option: --bogus" in _user_error("cancel", "5", "--bogus", env=env)
    assert _user_error("create", "x", "--after", "0", "--after", "-2", env=env).strip() == (
        "flowyard: error: no dependency task -2, 0: task ids are positive integers; "
        "list tasks with `flowyard queue list` (--after / blocked_by)"
    )


def test_list_names_a_status_typo_before_connecting() -> None:
    """`queue list --status bogus` resolved the database URL first: with the database unreachable
    (as the URL here is), the typo was reported as the connection error."""
    env = {"FLOWYARD_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    for given in ("bogus", "", "Pending"):
        assert _user_error("list", "--status", given, env=env).strip() == (
            f"flowyard: error: unknown status {given!r}; use one of draft, pending, "
            "in_progress, review, completed, failed, cancelled"
        )


def test_run_names_an_output_or_logs_dir_it_cannot_make_by_its_option(tmp_path) -> None:
    """A directory `queue run` cannot make was named by the flow's parameter (`output_dir`), not
    by the option the user typed. Said before connecting: the URL here refuses every connection."""
    env = {"FLOWYARD_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "FLOWYARD_HOME": str(tmp_path)}
    for option in ("--output-dir", "--logs-dir"):
        assert _user_error("run", option, "/proc/1/x", env=env).strip() == (
            f"flowyard: error: {option} /proc/1/x cannot be used as a directory: No such file or directory; "
            "pass a directory path"
        )


@pytest.mark.parametrize("option", ["--output-dir", "--logs-dir"])
def test_run_names_an_output_or_logs_dir_it_cannot_write_by_its_option(tmp_path, option: str) -> None:
    """A directory that exists but takes no new file (immutable here) passed `queue run`'s mkdir,
    and every task the run claimed failed on it. Said before connecting: the URL here refuses
    every connection. With --output-dir, the default logs directory inside it cannot be made
    either; the line names the option that was typed, not --logs-dir."""
    env = {"FLOWYARD_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "FLOWYARD_HOME": str(tmp_path / "home")}
    (tmp_path / "locked").mkdir()
    with immutable(tmp_path / "locked") as locked:
        assert _user_error("run", option, str(locked), env=env).strip() == (
            f"flowyard: error: {option} {locked} cannot be written: Operation not permitted; "
            "pass a writable directory path"
        )


def test_run_names_the_default_logs_dir_by_the_output_dir_given(tmp_path) -> None:
    """Only --output-dir given, and its default logs directory cannot be made (a file ``logs`` in
    it): the line named --logs-dir, an option the user never passed. Said before connecting: the
    URL here refuses every connection."""
    env = {"FLOWYARD_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "FLOWYARD_HOME": str(tmp_path / "home")}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "logs").write_text("not a directory")
    assert _user_error("run", "--output-dir", str(tmp_path / "out"), env=env).strip() == (
        f"flowyard: error: the logs directory in --output-dir (no --logs-dir given) {tmp_path / 'out' / 'logs'} "
        "cannot be used as a directory: File exists; pass a directory path"
    )


@pytest.mark.parametrize("made", [True, False], ids=["to-make", "existing"])
def test_run_says_an_output_dir_on_a_full_disk_is_on_a_full_disk(tmp_path, made: bool) -> None:
    """An output directory `queue run` could not make for want of space (or that exists but took no
    file: its disk's inodes used up) was said to "cannot be used as a directory" or "cannot be
    written", with "pass a (writable) directory path": advice that sent the operator after a typo.
    Said before connecting: the URL here refuses every connection."""
    env = {"FLOWYARD_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "FLOWYARD_HOME": str(tmp_path / "home")}
    with small_tmpfs(tmp_path / "full", inodes=2) as full:  # 2: its root and the filler
        fill_up(full)
        output = full / "agents" if made else full
        assert _user_error("run", "--output-dir", str(output), env=env).strip() == (
            f"flowyard: error: cannot write --output-dir {output}: No space left on device (disk full); "
            "make room for it (or pass a directory on another disk)"
        )


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("leave", [0, 4096], ids=["full_at_the_start", "filling_during_the_run"])
def test_a_full_prefect_result_storage_is_one_line_and_each_agent_runs_once(
    env: dict[str, str], tmp_path, leave: int
) -> None:
    """Prefect's result storage on a full disk (the queue's database elsewhere and fine): each task
    completed, its agent run once, but each task run then logged an error naming no disk ("An error
    was encountered while committing transaction 'agent-task-9-…'", with a traceback), read as the
    task failing. The run says once that the storage is full, and its tasks complete. Full at the
    start, the run keeps no result there; with room for the run's probe at its start (one page left,
    which the first result takes at most), it is full for the task runs after it."""
    tasks = [int(_ok("create", f"t{i}", "--payload", '{"steps": 2}', env=env)) for i in range(3)]
    with small_tmpfs(tmp_path / "results") as results:
        fill_up(results, leave=leave)
        result = run_cli(
            "queue", "run", "--output-dir", str(tmp_path / "out"), env={**env, "PREFECT_LOCAL_STORAGE_PATH": str(results)}
        )
    assert (result.returncode, result.stdout) == (0, "".join(f"task {t}: completed\n" for t in tasks)), result.stderr
    told = (
        f"cannot write Prefect's result storage {results}: No space left on device (disk full); make room for it "
        "(or set PREFECT_LOCAL_STORAGE_PATH to a directory on another disk); this run keeps its tasks' outcomes "
        "and checkpoints in the queue only, not as Prefect results"
    )
    assert result.stderr.count(told) == 1, result.stderr
    assert "transaction" not in result.stderr and "Traceback" not in result.stderr
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    assert [(queue.get_task(url, t).status, queue.get_task(url, t).attempts) for t in tasks] == [("completed", 1)] * 3


@pytest.mark.parametrize("title", ["two\nlines", "tab\there", "over\rwritten", "\x1b[31mred", "par\u2029t"])
def test_a_title_with_a_control_character_is_refused_in_one_line(title: str) -> None:
    """A newline in a title split its row in `queue list` (and a carriage return or a terminal
    escape garbled it). Refused before connecting: the URL here refuses every connection."""
    env = {"FLOWYARD_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    control = next(c for c in title if not c.isalnum())
    assert _user_error("create", title, env=env).strip() == (
        f"flowyard: error: the title {title!r} holds the control character {control!r}; give a one-line "
        "title and put the rest in the description (--description / description)"
    )


def test_a_title_is_stored_without_surrounding_spaces_and_a_long_one_is_refused_with_its_length(
    env: dict[str, str],
) -> None:
    """Spaces around a title were stored (and counted), and a title over 200 characters was refused
    without its length, so the user could not tell how much to cut."""
    task_id = int(_ok("create", "  fix the login page \n", env=env))
    assert queue.get_task(state_url(env["FLOWYARD_DATABASE_URL"]), task_id).title == "fix the login page"
    assert _user_error("create", "x" * 250, env=env).strip() == (
        "flowyard: error: the title has 250 characters, at most 200; shorten it and put the rest in the "
        "description (--description / description)"
    )


@pytest.mark.usefixtures("prefect_api")
def test_demo_graph_runs_with_a_resumed_crash(fresh_db: str, tmp_path) -> None:
    params = agent_queue_demo_parameters(fresh_db)
    summary = run_agent_queue(**params, output_dir=str(tmp_path))
    tasks = {t.title: t for t in queue.list_tasks(fresh_db)}
    assert set(summary["outcomes"].values()) == {"completed"} and len(summary["outcomes"]) == 4
    assert tasks["build the backend"].attempts == 2
    assert tasks["build the backend"].result["resumed_from"] == 2


def test_text_postgresql_cannot_store_and_out_of_range_numbers_are_one_line(env: dict[str, str], tmp_path) -> None:
    """Bytes that are not UTF-8 in a title (a shell in a Latin-1 locale) or a lone surrogate in
    the payload were a UnicodeEncodeError or PostgreSQL traceback; a blank title was stored; an
    infinite lease and a --max-agents past bigint failed the run with PostgreSQL's error; metrics
    printed its header before the error."""
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    assert "the title of task 'bad\\udcff' is not valid UTF-8" in _user_error("create", "bad\udcff", env=env)
    assert "the description of task 'x' is not valid UTF-8" in _user_error(
        "create", "x", "--description", "d\udcfe", env=env
    )
    assert "the payload of task 'x' is not valid UTF-8" in _user_error(
        "create", "x", "--payload", '{"a": "\\ud800"}', env=env
    )
    assert "the title must have 1 to 200 characters, not only spaces" in _user_error("create", "   ", env=env)
    assert queue.list_tasks(url) == []
    assert "the lease must be a finite number of seconds, at most 31536000, not 1e+300" in _user_error(
        "run", "--lease", "1e300", env=env
    )
    assert f"max_agents must be 1 to 10000, not {2**63}" in _user_error("run", "--max-agents", str(2**63), env=env)
    notes = tmp_path / "notes.yaml"
    notes.write_text("just some notes\n")
    assert "agent templates must map each agent type to {argv, delivery, env}" in _user_error(
        "run", "--agents-file", str(notes), env=env
    )
    assert f"cannot read agents file {tmp_path}: it is a directory; give the YAML or JSON file" in _user_error(
        "run", "--agents-file", str(tmp_path), env=env
    )
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"caf\xe9: {argv: [x]}\n")
    assert f"cannot read agents file {latin1}: 'utf-8' codec can't decode" in _user_error(
        "run", "--agents-file", str(latin1), env=env
    )
    # checked before the flow run, so Prefect's log lines of a failed run do not come with it
    for option in ("--output-dir", "--logs-dir"):
        message = f"{option} {notes} cannot be used as a directory: File exists; pass a directory path"
        assert message in _user_error("run", option, str(notes), env=env)
    metrics = run_cli("queue", "metrics", "-d", "http://x", env=env)
    assert metrics.returncode == 2 and metrics.stdout == ""


@pytest.mark.parametrize("nested", ["[" * 100_000, '{"a":' * 5_000 + "1" + "}" * 5_000])
def test_a_payload_nested_too_deeply_to_read_is_one_line(env: dict[str, str], nested: str) -> None:
    """The JSON parser gives up past Python's recursion limit with a RecursionError, which was a
    traceback (it is no ValueError, what an invalid payload raises)."""
    assert _user_error("create", "x", "--payload", nested, env=env).strip() == (
        "flowyard: error: --payload nests too deeply to read (over about 1,000 levels of objects or arrays); "
        "flatten it"
    )
    assert queue.list_tasks(state_url(env["FLOWYARD_DATABASE_URL"])) == []


def test_a_payload_integer_past_the_digit_limit_is_one_line_without_python_advice(env: dict[str, str]) -> None:
    """Past 4,300 digits the message was int's "use sys.set_int_max_str_digits() to increase the
    limit", advice the user of a command cannot take, under "--payload is not valid JSON"."""
    huge = "9" * 4301
    assert _user_error("create", "x", "--payload", f'{{"a": [-{huge}]}}', env=env).strip() == (
        "flowyard: error: --payload holds an integer of 4301 digits, over the 4300 that can be read; "
        "pass it as a string"
    )
    assert queue.list_tasks(state_url(env["FLOWYARD_DATABASE_URL"])) == []


@pytest.mark.parametrize(
    ("templates", "what"),
    [
        ('x: {argv: ["run\\ud83d\\ude00"]}', "agent template 'x' is invalid: argv: argument 'run\\ud83d\\ude00'"),
        ('x: {argv: [run], env: {MOOD: "\\ud800"}}', "agent template 'x' is invalid: env: the value of MOOD"),
        ('"x\\udcff": {argv: [run]}', "agent type 'x\\udcff' in the agent templates"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_in_the_agents_file_is_one_line(
    env: dict[str, str], tmp_path, templates: str, what: str
) -> None:
    """YAML reads JSON's escapes of an emoji as two lone surrogates, which cannot be encoded: `queue
    run` was a UnicodeEncodeError traceback from Prefect storing the flow run's parameters."""
    agents = tmp_path / "agents.yaml"
    agents.write_text(templates + "\n")
    assert _user_error("run", "--agents-file", str(agents), env=env).strip() == (
        f"flowyard: error: {agents} is not a valid agent template file ({what} is not valid UTF-8 (an "
        "unpaired \\ud800-\\udfff escape); write the character itself, or \\U and 8 hex digits in a "
        "double-quoted YAML string)"
    )


def test_an_agents_file_that_is_not_yaml_says_what_is_wrong_and_where(env: dict[str, str], tmp_path) -> None:
    """The message was YAML's first line, its context alone: "(while parsing a flow sequence)"."""
    agents = tmp_path / "agents.yaml"
    agents.write_text("coder:\n  argv: [claude, -p\n")
    assert _user_error("run", "--agents-file", str(agents), env=env).strip() == (
        f"flowyard: error: {agents} is not a valid agent template file (expected ',' or ']', but got "
        "'<stream end>' at line 3, column 1)"
    )


def test_a_workdir_name_no_file_system_takes_is_refused_when_the_task_is_created(env: dict[str, str]) -> None:
    """A directory name over 255 bytes was accepted, and the run then failed the task with
    Prefect's "Task run encountered an exception OSError: [Errno 36] File name too long"."""
    assert _user_error("create", "x", "--workdir", f"ok/{'w' * 256}", env=env).strip() == (
        "flowyard: error: the working directory has a directory name of 256 bytes, over the 255 "
        "a file system allows; use shorter names (nest directories with '/')"
    )
    assert queue.list_tasks(state_url(env["FLOWYARD_DATABASE_URL"])) == []
    assert _ok("create", "x", "--workdir", f"{'w' * 255}/{'é' * 127}", env=env).strip().isdigit()


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("workdir", [" ", "\u3000 "])
def test_a_whitespace_only_workdir_is_refused_by_the_cli_and_the_flow(env: dict[str, str], workdir: str) -> None:
    """Only an empty workdir means the task's own directory (task-<id>); one of spaces was
    accepted and the agent worked in a directory named by them, invisible wherever it is shown."""
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    message = (
        f"the working directory {workdir!r} is only whitespace; leave it out (--workdir / workdir) "
        "for the task's own directory (task-<id>), or name a directory"
    )
    assert _user_error("create", "x", "--workdir", workdir, env=env).strip() == f"flowyard: error: {message}"
    with pytest.raises(UserError) as info:
        agent_task_create("y", workdir=workdir, database_url=url)
    assert str(info.value) == message
    assert queue.list_tasks(url) == []
    assert queue.get_task(url, int(_ok("create", "x", env=env))).workdir == ""


def test_a_workdir_through_a_symlink_loop_is_refused_when_the_task_is_created(env: dict[str, str], tmp_path) -> None:
    """It was Python's traceback ending in "RuntimeError: Symlink loop from ..."."""
    agents = tmp_path / "home" / "agents"
    agents.mkdir(parents=True)
    (agents / "loop").symlink_to(agents / "loop")
    home = {**env, "FLOWYARD_HOME": str(tmp_path / "home")}
    assert _user_error("create", "x", "--workdir", "loop/sub", env=home).strip() == (
        f"flowyard: error: working directory 'loop/sub' ({agents / 'loop' / 'sub'}) runs into a symlink loop; "
        "remove the loop or give the task another directory"
    )
    assert queue.list_tasks(state_url(env["FLOWYARD_DATABASE_URL"])) == []


@pytest.mark.usefixtures("prefect_api")
def test_a_workdir_is_checked_against_the_output_and_logs_directories_of_the_run_that_will_run_it(
    env: dict[str, str], tmp_path
) -> None:
    """Checked against the default output directory only, a run elsewhere was wrongly served: a
    link out of its own output directory was accepted (its task failed when run), and ``logs``
    was refused though the run logs to another directory."""
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "out").symlink_to(tmp_path)
    assert _user_error("create", "x", "--workdir", "out/t", "--output-dir", str(runs), env=env).strip() == (
        f"flowyard: error: working directory 'out/t' resolves to {tmp_path / 't'}, outside the agent output "
        f"directory {runs}; use a relative path that stays inside it (no '..', no symlinks out)"
    )
    assert "in the agents' logs directory" in _user_error("create", "x", "--workdir", "logs", env=env)
    task = int(_ok("create", "x", "--workdir", "logs", "--logs-dir", str(tmp_path / "logs"), env=env))
    assert queue.get_task(url, task).workdir == "logs"
    assert "--output-dir is empty" in _user_error("create", "x", "--output-dir", "", env=env)
    flow_task = agent_task_create("y", workdir="logs", logs_dir=str(tmp_path / "logs"), database_url=url)
    assert flow_task["workdir"] == "logs"
    with pytest.raises(UserError, match="outside the agent output directory"):
        agent_task_create("z", workdir="out/t", output_dir=str(runs), database_url=url)


@pytest.mark.usefixtures("prefect_api")
def test_a_file_in_the_way_of_a_working_directory_fails_its_task_once_saying_so(env: dict[str, str], tmp_path) -> None:
    """The task failed with Python's "NotADirectoryError: [Errno 20] Not a directory" (FileExistsError
    for a file at the workdir itself), after retries that could not cure it; the file is left as it was."""
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    (tmp_path / "notes").write_text("mine\n")
    task = queue.create_task(url, queue.NewTask(title="x", agent_type="reference", workdir="notes/sub"))
    summary = run_agent_queue(database_url=url, output_dir=str(tmp_path), retries=2)
    assert summary["outcomes"][task].endswith(
        f"the working directory of task {task} {tmp_path / 'notes' / 'sub'} cannot be used as a directory: "
        "Not a directory; pass a directory path"
    ), summary["outcomes"][task]
    assert queue.get_task(url, task).attempts == 1
    assert (tmp_path / "notes").read_text() == "mine\n"


@pytest.mark.usefixtures("prefect_api")
def test_run_flow_refuses_bad_counts_and_templates_in_one_line(env: dict[str, str], tmp_path) -> None:
    """Over the API, max_agents 0 failed with ThreadPoolExecutor's ValueError, a negative
    max_tasks or retries ran as if unset, and a bad template was pydantic's "1 validation error
    for AgentTemplate". A run refused for a bad limit or template had created its directories."""
    from tasks.errors import UserError

    task = int(_ok("create", "kept", env=env))
    outputs = tmp_path / "agents-of-a-refused-run"
    for params, message in (
        ({"max_agents": 0}, "max_agents must be 1 to 10000, not 0"),
        ({"max_tasks": -1}, "max_tasks must be 0 or more (or None for no limit), not -1"),
        ({"retries": -1}, "retries (--retries / retries) -1 is out of range; give 0 to 100"),
        ({"retries": 10**12}, f"retries (--retries / retries) {10**12} is out of range; give 0 to 100"),
        ({"timeout_seconds": 10.0**9}, "the agent timeout (--timeout / timeout_seconds) 1000000000.0 is out of range"),
        ({"grace_seconds": 10.0**9}, "the grace period (--grace / grace_seconds) 1000000000.0 is out of range"),
        ({"grace_seconds": float("inf")}, "run-agent-queue: parameter grace_seconds is Infinity: not a finite number"),
        (
            {"checkpoint_wait_seconds": -1.0},
            "the checkpoint wait (--checkpoint-wait / checkpoint_wait_seconds) -1.0 is out of range; give 0 to 31536000",
        ),
        ({"agents": {"x": {"argv": 5}}}, "agent template 'x' is invalid: argv: Input should be a valid list"),
    ):
        with pytest.raises(UserError) as info:
            run_agent_queue(database_url=env["FLOWYARD_DATABASE_URL"], output_dir=str(outputs), **params)
        assert str(info.value).startswith(message), str(info.value)
        assert not outputs.exists(), f"{params} created the output directory"
    assert queue.get_task(state_url(env["FLOWYARD_DATABASE_URL"]), task).status == "pending"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--timeout", "inf", "--timeout is Infinity; give a finite number of seconds"),
        ("--timeout", "1e9", "the agent timeout (--timeout / timeout_seconds) 1000000000.0 is out of range; give 1 to 31536000 seconds"),
        ("--timeout", "1e-300", "the agent timeout (--timeout / timeout_seconds) 1e-300 is out of range; give 1 to 31536000 seconds"),
        ("--timeout", "1e-9", "the agent timeout (--timeout / timeout_seconds) 1e-09 is out of range; give 1 to 31536000 seconds"),
        ("--grace", "inf", "--grace is Infinity; give a finite number of seconds"),
        ("--grace", "nan", "--grace is NaN; give a finite number of seconds"),
        ("--lease", "-inf", "--lease is -Infinity; give a finite number of seconds"),
        ("--retries", str(10**12), f"retries (--retries / retries) {10**12} is out of range; give 0 to 100"),
        ("--checkpoint-wait", "inf", "--checkpoint-wait is Infinity; give a finite number of seconds"),
        ("--grace", "1e-6", "the grace period (--grace / grace_seconds) 1e-06 is out of range; give 0 (no wait) or 0.001 to 31536000 seconds: a shorter wait acts as 0"),
        ("--checkpoint-wait", "0.0005", "the checkpoint wait (--checkpoint-wait / checkpoint_wait_seconds) 0.0005 is out of range; give 0 (no wait) or 0.001 to 31536000 seconds: a shorter wait acts as 0"),
    ],
)  # fmt: skip
def test_an_unbounded_timeout_grace_or_retries_is_one_line_before_anything_is_claimed(
    env: dict[str, str], option: str, value: str, message: str
) -> None:
    """--timeout inf let a hung agent run for good, --grace inf had a shutdown wait for good on an
    agent ignoring SIGTERM, and --retries 10**12 retried a broken agent without end."""
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    task = queue.create_task(url, queue.NewTask(title="kept", agent_type="reference"))
    assert _user_error("run", option, value, env=env).strip().endswith(message)
    assert (queue.get_task(url, task).status, queue.get_task(url, task).attempts) == ("pending", 0)


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize(
    ("option", "fix"),
    [
        ("--output-dir", "pass a directory path, or leave the option out for the default (<FLOWYARD_HOME>/agents)"),
        ("--logs-dir", "pass a directory path, or leave the option out for the default (<output dir>/logs)"),
        ("--agents-file", "pass a file path, or leave the option out for the default (the built-in agents only)"),
    ],
)
def test_an_empty_path_option_is_one_line_not_the_current_directory(
    env: dict[str, str], tmp_path, option: str, fix: str
) -> None:
    """``--output-dir ""`` (or ``--logs-dir ""``, an unset shell variable) was read as ``.``: the run
    put its agents' work or logs in whatever directory the command was started from; an empty
    ``--agents-file`` said "cannot read agents file .", a file nobody named."""
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    task = queue.create_task(url, queue.NewTask(title="kept", agent_type="reference"))
    importable = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = run_cli("queue", "run", option, "", cwd=tmp_path, env=env | importable)
    assert (result.returncode, result.stderr) == (2, f"flowyard: error: {option} is empty; {fix}\n")
    assert list(tmp_path.iterdir()) == [], "nothing was made in the current directory"
    assert (queue.get_task(url, task).status, queue.get_task(url, task).attempts) == ("pending", 0)


def test_the_listing_says_a_pending_task_needs_an_agent_that_is_not_built_in(env: dict[str, str]) -> None:
    """A `coder` task waits for good unless a `queue run --agents-file` has a `coder` agent (the
    scheduled drain has the built-in ones only); the listing said just `pending`."""
    coder = int(_ok("create", "write code", "--agent-type", "coder", env=env))
    builtin = int(_ok("create", "reference work", env=env))
    listing = {int(line.split()[0]): line for line in _ok("list", env=env).splitlines()[1:]}
    assert listing[coder].endswith(
        "write code  — runs only with a 'coder' agent: `flowyard queue run --agents-file FILE` "
        "(built in: reference)"
    )
    assert listing[builtin].endswith("reference work")


def test_a_title_stored_with_control_characters_stays_on_its_row(env: dict[str, str]) -> None:
    """flowyard refuses such titles now, but a row written before it did (or by hand) still
    split `queue list` at its newline and let its escape recolour the terminal. The listing
    shows each control character as its escape; the task keeps its title as stored."""
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    with connection(url) as conn:
        (stored,) = conn.execute(
            "INSERT INTO flowyard.agent_tasks (title, priority, status, agent_type) "
            "VALUES (%s, 'medium', 'pending', %s) RETURNING id",
            ("two\nlines\x1b[31m", "odd\ttype"),
        ).fetchone()
    after = int(_ok("create", "after it", env=env))
    rows = _ok("list", env=env).splitlines()[1:]
    assert [int(row.split()[0]) for row in rows] == [stored, after]
    assert " odd\\ttype " in rows[0] and "two\\nlines\\x1b[31m  — runs only with a 'odd\\ttype' agent" in rows[0]
    assert queue.get_task(url, stored).title == "two\nlines\x1b[31m"


@pytest.mark.usefixtures("prefect_api")
def test_a_multi_line_agent_error_is_one_line_in_the_listing_and_the_run_output(
    env: dict[str, str], tmp_path
) -> None:
    """An agent may report a whole traceback as its error: ``queue list`` printed it across the
    table's rows and ``queue run`` across its per-task lines; an error of megabytes on one line
    filled both. They now show its first line, cut at ``LINE_LIMIT`` characters, and how much
    was left out; the task keeps the full text."""
    first = "disk full " + "x" * (2 * LINE_LIMIT)
    error = f"{first}\nTraceback (most recent call last):\n  File 'agent.py', line 3"
    failing = int(_ok("create", "doomed", "--payload", json.dumps({"fail": error}), env=env))
    result = run_cli("queue", "run", "--output-dir", str(tmp_path), "--retries", "0", env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    stored = queue.get_task(env["FLOWYARD_DATABASE_URL"], failing).error or ""
    assert error in stored  # the task keeps the full text, after the attempt's words
    head = stored.splitlines()[0]
    shown = f"{head[:LINE_LIMIT]}… ({len(head) - LINE_LIMIT} more characters) … (2 more lines)"
    assert "disk full" in shown
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(f"task {failing}: ")]
    assert line == f"task {failing}: failed: {shown}", line[-300:]
    assert "Traceback" not in result.stdout
    rows = _ok("list", "--status", "failed", env=env).splitlines()[1:]
    assert len(rows) == 1 and rows[0].endswith(f"  — {shown}"), rows[0][-300:]


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize(
    ("template", "message"),
    [
        ('{argv: ["true"], env: {"A=B": "1"}}', "env: variable name 'A=B' holds '=', which separates a name from its value"),
        ('{argv: ["tr\\0ue"]}', "argv: argument 'tr\\x00ue' holds a NUL character (\\0), which no program can be given"),
        ('{argv: ["true"], env: {"A": "x\\0y"}}', "env: the value of A holds a NUL character (\\0), which no program can be given"),
        ('{argv: ["true"], deliver: env}', "deliver: unknown field; a template takes argv, delivery and env"),
        ('{argv: ["true"], note: "\\0"}', "note: unknown field; a template takes argv, delivery and env"),
    ],
)  # fmt: skip
def test_a_template_no_program_can_be_started_with_is_one_line_before_anything_is_claimed(
    env: dict[str, str], tmp_path, template: str, message: str
) -> None:
    """An environment variable name holding '=' passed validation, and every task of the type was
    claimed and failed after its retries with "ValueError: illegal environment variable name"; a
    NUL (YAML's "\\0") in an argument or a value made `queue run` a traceback, the flow run's
    parameters being unstorable. A misspelt field was dropped in silence (``deliver: env`` left
    the envelope on stdin, failing every attempt), and a NUL in one made the same traceback."""
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    task = int(_ok("create", "kept", "--agent-type", "coder", env=env))
    agents = tmp_path / "agents.yaml"
    agents.write_text(f"coder: {template}\n")
    error = _user_error("run", "--agents-file", str(agents), "--output-dir", str(tmp_path), env=env)
    assert error.strip() == (
        f"flowyard: error: {agents} is not a valid agent template file (agent template 'coder' is invalid: {message})"
    )
    with pytest.raises(UserError, match="agent template 'coder' is invalid: env: variable name 'A=B' holds '='"):
        run_agent_queue(
            database_url=env["FLOWYARD_DATABASE_URL"],
            output_dir=str(tmp_path),
            agents={"coder": {"argv": ["true"], "env": {"A=B": "1"}}},
        )
    stored = queue.get_task(url, task)
    assert (stored.status, stored.attempts) == ("pending", 0)


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize(
    ("key", "shown"),
    [("1", "1 in the agent templates is not text but int"), ("on", "True in the agent templates is not text but bool")],
)
def test_an_agent_type_yaml_reads_as_no_text_is_one_line(
    env: dict[str, str], tmp_path, key: str, shown: str
) -> None:
    """YAML reads a bare `1:` or `on:` as a number or a boolean: the agents file passed the
    check, and `queue run` was a traceback of Prefect refusing the `agents` parameter."""
    agents = tmp_path / "agents.yaml"
    agents.write_text(f'{key}: {{argv: ["true"]}}\n')
    error = _user_error("run", "--agents-file", str(agents), "--output-dir", str(tmp_path), env=env)
    assert error.strip() == (
        f"flowyard: error: {agents} is not a valid agent template file (agent type {shown}; quote it "
        "(YAML reads bare numbers, yes/no, on/off and null as other types))"
    )
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text(f'"{key}": {{argv: ["true"]}}\n')
    assert _ok("run", "--agents-file", str(quoted), "--output-dir", str(tmp_path), env=env) == "no ready tasks\n"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is empty;"),
        (" coder", "' coder' starts or ends with a space;"),
        ("co\tder", "'co\\tder' holds the control character '\\t';"),
        ("co\u200bder", "'co\\u200bder' holds the invisible character U+200B (ZERO WIDTH SPACE);"),
        ("a" * (queue.MAX_AGENT_TYPE_LENGTH + 1), "has 64 characters; at most 63 are accepted:"),
    ],
)
def test_an_agent_type_in_the_templates_that_no_task_can_have_is_one_line(
    env: dict[str, str], tmp_path, name: str, problem: str
) -> None:
    """A template follows a task's agent-type rule: one named empty, with a space at an end, with
    a control character or with more characters than a task's type may have was accepted, and no
    task (whose type cannot be so) could use it. The longest a task may have is accepted."""
    agents = tmp_path / "agents.yaml"
    agents.write_text(json.dumps({name: {"argv": ["true"]}}) + "\n")  # JSON is YAML: the name as given
    error = _user_error("run", "--agents-file", str(agents), "--output-dir", str(tmp_path), env=env)
    assert error.strip() == (
        f"flowyard: error: {agents} is not a valid agent template file (an agent type in the agent templates "
        f"{problem} rename that template as a task's agent type can be named (no task could use it))"
    ), error
    longest = "a" * queue.MAX_AGENT_TYPE_LENGTH
    assert set(templates_from({longest: {"argv": ["true"]}})) == {"reference", longest}


@pytest.mark.parametrize("agent_type", ["coder\n", "a b\tc", "\x1b[31mred"])
def test_an_agent_type_with_a_control_character_is_refused_in_one_line(env: dict[str, str], agent_type: str) -> None:
    """An agent type is a column of `queue list` like the title: a newline or tab in one was
    stored, split or garbled the task's row, and left the task waiting for an agent no sane
    templates file names."""
    control = next(c for c in agent_type if not (c.isalnum() or c in " ["))
    assert _user_error("create", "x", "--agent-type", agent_type, env=env).strip() == (
        f"flowyard: error: the agent type of task 'x' {agent_type!r} holds the control character {control!r}; "
        "name the agent template that runs it, such as 'reference' (--agent-type / agent_type)"
    )
    assert queue.list_tasks(state_url(env["FLOWYARD_DATABASE_URL"])) == []


@pytest.mark.parametrize(("agent_type", "code_point"), [("coder\u200b", "U+200B"), ("\ufeffcoder", "U+FEFF")])
def test_an_agent_type_with_an_invisible_character_is_refused_naming_its_code_point(
    env: dict[str, str], agent_type: str, code_point: str
) -> None:
    """A zero-width space or byte order mark pasted with the name was stored: the task listed as
    ``coder`` and waited for good, since the ``coder`` template does not run ``coder\\u200b``."""
    error = _user_error("create", "x", "--agent-type", agent_type, env=env)
    assert f"the agent type of task 'x' {agent_type!r} holds the invisible character {code_point} (" in error
    assert queue.list_tasks(state_url(env["FLOWYARD_DATABASE_URL"])) == []


def test_an_agent_type_stored_with_control_characters_stays_on_its_metrics_row(env: dict[str, str]) -> None:
    """As in `queue list`: a type stored before flowyard refused control characters (or by hand)
    split `queue metrics` at its newline and let its escape recolour the terminal; its row shows
    each one as its escape."""
    with connection(state_url(env["FLOWYARD_DATABASE_URL"])) as conn:
        conn.execute(
            "INSERT INTO flowyard.agent_tasks (title, priority, status, agent_type) "
            "VALUES ('done', 'medium', 'completed', %s), ('also done', 'medium', 'completed', 'reference')",
            ("two\nlines\x1b[31m",),
        )
    rows = _ok("metrics", env=env).splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["reference", "two\\nlines\\x1b[31m"], rows


def test_an_agent_type_longer_than_its_metrics_column_keeps_the_table_in_line(env: dict[str, str]) -> None:
    """The agent-type column of `queue metrics` was 14 characters wide, where a type may have 63:
    a longer one pushed its row's counts out from under their headers. The column widens."""
    long_type = "a-rather-long-agent-type"
    with connection(state_url(env["FLOWYARD_DATABASE_URL"])) as conn:
        conn.execute(
            "INSERT INTO flowyard.agent_tasks (title, priority, status, agent_type) "
            "VALUES ('done', 'medium', 'completed', %s), ('also done', 'medium', 'failed', 'reference')",
            (long_type,),
        )
    header, *rows = _ok("metrics", env=env).splitlines()
    for column, cells in (("completed", ["1", "0"]), ("failed", ["0", "1"])):
        end = header.index(column) + len(column)  # the counts are right-aligned under their headers
        assert [row[:end].split()[-1] for row in rows] == cells, (header, rows)
    assert [row.split()[0] for row in rows] == [long_type, "reference"], rows


@pytest.mark.usefixtures("prefect_api")
def test_an_agent_error_with_control_characters_stays_on_its_run_line(env: dict[str, str], tmp_path) -> None:
    """`queue list` shows an agent's error with each control character as its escape; `queue run`
    printed it raw in its `task N: failed: …` line, where a tab or a terminal escape (an agent
    reporting coloured output) garbled or recoloured the run's output."""
    error = "disk\x1b[31m full\tagain"
    failing = int(_ok("create", "doomed", "--payload", json.dumps({"fail": error}), env=env))
    result = run_cli("queue", "run", "--output-dir", str(tmp_path), "--retries", "0", env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(f"task {failing}: ")]
    assert "disk\\x1b[31m full\\tagain" in line, line
    assert control_character(result.stdout.replace("\n", "")) is None, result.stdout
    assert error in (queue.get_task(env["FLOWYARD_DATABASE_URL"], failing).error or "")


def test_metrics_shows_the_interrupted_attempts_it_leaves_out_of_the_times(env: dict[str, str]) -> None:
    """docs/agents.md: interrupted attempts (graceful shutdown, a dead worker's) are counted apart
    and left out of the times. `queue metrics` left them out altogether, so a type whose agents
    were stopped again and again looked like one that barely ran; it shows the count the
    `agent-metrics` artifact has, beside the attempts."""
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    worker = queue.new_worker_id()
    done = queue.create_task(url, queue.NewTask(title="done", agent_type="reference"))
    stopped = queue.create_task(url, queue.NewTask(title="stopped twice", agent_type="reference"))
    for task_id, outcome in ((done, "completed"), (stopped, "interrupted"), (stopped, "interrupted")):
        queue.claim_ready(url, worker, 1)
        attempt = queue.start_attempt(url, task_id, worker, None)
        queue.finish_attempt(url, attempt.run_id, worker, outcome, result={} if outcome == "completed" else None)
    header, row = _ok("metrics", env=env).splitlines()
    columns = header.replace("agent type", "agent_type").split()
    shown = dict(zip(columns, row.split(), strict=False))
    assert (shown["completed"], shown["attempts"], shown.get("interrupted")) == ("1", "1", "2"), (header, row)


def test_a_checkpoint_label_longer_than_its_column_keeps_the_listing_in_line(env: dict[str, str]) -> None:
    """The checkpoint column was 18 characters wide: ``graceful_shutdown@12`` pushed the rest of its
    row two characters out of line with the header. The column widens; nothing is cut."""
    url = state_url(env["FLOWYARD_DATABASE_URL"])
    first = int(_ok("create", "often-stopped", env=env))
    _ok("create", "dependent", "--after", str(first), env=env)
    label = {"attempt": 12, "kind": "graceful_shutdown", "state": {"step": 3}}
    with connection(url) as conn:
        conn.execute(
            "UPDATE flowyard.agent_tasks SET last_checkpoint = %s::jsonb WHERE id = %s", (json.dumps(label), first)
        )
    header, *rows = _ok("list", env=env).splitlines()
    for column, cells in (
        ("ckpt", ["graceful_shutdown@12", "-"]),
        ("after", ["-", str(first)]),
        ("title", ["often-stopped", "dependent"]),
    ):
        start = header.index(column)
        assert [row[start:].split()[0] for row in rows] == cells, (header, rows)
