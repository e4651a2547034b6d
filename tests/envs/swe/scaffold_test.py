"""The agent's scaffold through SWEEnv.step: editor, search, truncation, system prompt, overflow.

Every tool runs in the local sandbox of a task from the shipped set; file
contents are checked against plain-Python references (read from the host
side of the workspace).
"""
import os
import random

import pytest

from aem_jax.envs.swe import SWEEnv, read_jsonl, scripted, tools
from aem_jax.envs.swe.dataset import LOCAL_TASKS

TASK = read_jsonl(LOCAL_TASKS)[0]  # a task whose gold patch is one str_replace
call = scripted.call


@pytest.fixture(scope="module")
def env():
    swe = SWEEnv(tasks=[TASK], max_turns=200, command_timeout_s=30, max_processes=128)
    yield swe
    swe.close()


@pytest.fixture
def fresh(env):
    env.reset(seed=0)
    return env


def _read(env, path):
    with open(os.path.join(env._sandbox.workspace, path), "rb") as f:
        return f.read().decode("utf-8")


def _ok(env, action):
    step = env.step(action)
    assert not step.done and not step.info["invalid_action"], step.observation
    return step.observation


def _lines_text(rng, n):
    return "".join(f"line {rng.randrange(10**6)} {i}\n" for i in range(n))


def test_the_tools_are_in_the_system_prompt_and_the_task_in_the_first_message(fresh):
    obs = fresh.reset(seed=0)
    assert TASK.problem_statement.strip() in obs.text and "<function=" not in obs.text
    for name in tools.TOOLS:
        assert f"- {name}:" in fresh.system_prompt
    assert fresh.system_prompt == tools.SYSTEM_PROMPT and fresh.corpus() == [tools.SYSTEM_PROMPT]
    assert SWEEnv(tasks=[TASK], system_prompt="custom").system_prompt == "custom"
    # Every documented parameter is one the parser accepts.
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in tools.tool_schemas()}
    assert set(schemas) == set(tools.TOOLS)
    assert schemas["insert"]["properties"]["insert_line"]["type"] == "integer"


def test_insert_str_replace_create_and_undo_follow_a_python_reference(fresh):
    rng = random.Random(0)
    files = {"pkg/a.py": _lines_text(rng, 6), "pkg/b.txt": _lines_text(rng, 3)}
    state, history = {}, {path: [] for path in files}
    for path, text in files.items():
        _ok(fresh, call("create", path=path, file_text=text))
        state[path] = text
        history[path].append(None)  # undoing the creation removes the file
    for step_index in range(40):
        path = rng.choice(sorted(files))
        op = rng.choice(["insert", "insert", "str_replace", "undo", "bad_insert"])
        if path not in state:  # its creation was undone: create it again
            text = _lines_text(rng, 2)
            _ok(fresh, call("create", path=path, file_text=text))
            state[path] = text
            history[path].append(None)
            continue
        lines = state[path].splitlines(keepends=True)
        if op == "insert":
            n = rng.randint(0, len(lines))
            new = rng.choice(["x = 1", "y = 2\nz = 3", "w = 4\n", ""])
            observation = _ok(fresh, call("insert", path=path, insert_line=str(n), new_str=new))
            added = (new if new.endswith("\n") else new + "\n").splitlines(keepends=True)
            history[path].append(state[path])
            state[path] = "".join(lines[:n] + added + lines[n:])
            assert f"after line {n} of {path}" in observation
        elif op == "str_replace":
            target = rng.choice(lines)
            observation = _ok(fresh, call("str_replace", path=path, old_str=target,
                                          new_str=f"edited {step_index}\n"))
            occurrences = state[path].count(target)
            if occurrences == 1:
                history[path].append(state[path])
                state[path] = state[path].replace(target, f"edited {step_index}\n", 1)
                assert f"edited {step_index}" in observation
            else:  # not unique: an error, nothing changed, nothing to undo
                assert f"occurs {occurrences} times" in observation
        elif op == "bad_insert":  # out of range: nothing changes, nothing to undo
            observation = _ok(fresh, call("insert", path=path, insert_line=str(len(lines) + 1),
                                          new_str="nope"))
            assert f"outside 0..{len(lines)}" in observation and "[exit code: 1]" in observation
        elif history[path]:
            observation = _ok(fresh, call("undo_edit", path=path))
            previous = history[path].pop()
            assert f"{len(history[path])} earlier edit(s)" in observation
            if previous is None:
                del state[path]
            else:
                state[path] = previous
        for p in files:
            if p in state:
                assert _read(fresh, p) == state[p], (step_index, op, p)
            else:
                assert not os.path.exists(os.path.join(fresh._sandbox.workspace, p))
    # Undoing everything restores the base repository: the diff is empty, and the
    # history (kept in .git) is never part of the evaluated change.
    diff, _ = fresh.current_diff()
    assert "aem_edit_history" not in diff
    for path in files:
        while history[path]:
            _ok(fresh, call("undo_edit", path=path))
            history[path].pop()
        assert "no edit of" in _ok(fresh, call("undo_edit", path=path))
    assert fresh.current_diff() == ("", "")


def test_insert_edges_and_crlf_files(fresh):
    _ok(fresh, call("create", path="t.txt", file_text="a\nb"))  # no final newline
    _ok(fresh, call("insert", path="t.txt", insert_line="2", new_str="c"))
    assert _read(fresh, "t.txt") == "a\nb\nc\n"
    _ok(fresh, call("insert", path="t.txt", insert_line="0", new_str="top"))
    assert _read(fresh, "t.txt") == "top\na\nb\nc\n"
    observation = _ok(fresh, call("insert", path="t.txt", insert_line="two", new_str="x"))
    assert "must be an integer" in observation
    _ok(fresh, call("create", path="w.txt", file_text="one\r\ntwo\r\n"))
    _ok(fresh, call("str_replace", path="w.txt", old_str="one\ntwo", new_str="1\n2"))
    _ok(fresh, call("insert", path="w.txt", insert_line="1", new_str="1.5\nmore"))
    assert _read(fresh, "w.txt") == "1\r\n1.5\r\nmore\r\n2\r\n"
    assert "     2\t1.5\n" in _ok(fresh, call("view", path="w.txt"))
    for expected in ("1\r\n2\r\n", "one\r\ntwo\r\n"):
        _ok(fresh, call("undo_edit", path="w.txt"))
        assert _read(fresh, "w.txt") == expected
    # An edit that fails changes nothing and records nothing.
    _ok(fresh, call("str_replace", path="w.txt", old_str="absent", new_str="x"))
    assert "undid the creation" in _ok(fresh, call("undo_edit", path="w.txt"))


def test_undo_history_keeps_the_last_levels(fresh, monkeypatch):
    monkeypatch.setattr(tools, "UNDO_LEVELS", 3)
    _ok(fresh, call("create", path="u.txt", file_text="0\n"))
    for i in range(1, 6):
        _ok(fresh, call("insert", path="u.txt", insert_line=str(i), new_str=str(i)))
    for remaining in (2, 1, 0):
        assert f"{remaining} earlier edit(s)" in _ok(fresh, call("undo_edit", path="u.txt"))
    assert _read(fresh, "u.txt") == "0\n1\n2\n"
    assert "no edit of u.txt" in _ok(fresh, call("undo_edit", path="u.txt"))


def test_editor_and_other_scaffolds_names(fresh):
    action = ('<tool_call>\n{"name": "file_editor", "arguments": {"command": "insert", '
              '"path": "n.txt", "insert_line": 0, "new_str": "hi"}}\n</tool_call>')
    _ok(fresh, call("create", path="n.txt", file_text="x\n"))
    _ok(fresh, action)
    assert _read(fresh, "n.txt") == "hi\nx\n"
    observation = _ok(fresh, '<function=str_replace_editor>\n<parameter=command>view'
                             '</parameter>\n<parameter=path>n.txt</parameter>\n</function>')
    assert observation.startswith("     1\thi\n     2\tx")
    assert _ok(fresh, "<function=execute_bash><parameter=cmd>echo $((6*7))</parameter>"
                      "</function>").startswith("42\n")
    step = fresh.step("<function=file_editor><parameter=command>delete</parameter></function>")
    assert step.info["invalid_action"] and "'command', one of" in step.observation
    step = fresh.step("<function=finish><parameter=result>done</parameter></function>")
    assert step.done and "evaluation" in step.info


def test_search_counts_and_caps_match_a_python_reference(fresh, monkeypatch):
    monkeypatch.setattr(tools, "SEARCH_MAX_FILES", 4)
    monkeypatch.setattr(tools, "SEARCH_MAX_LINES", 3)
    rng = random.Random(1)
    contents = {}
    for i in range(7):
        lines = [f"needle {j}" if rng.random() < 0.4 else f"hay {j}" for j in range(12)]
        lines.append("needle last")
        contents[f"found/d{i % 3}/f{i}.py"] = "\n".join(lines) + "\n"
    contents["found/.hidden/h.py"] = "needle\n"  # hidden directories are skipped
    script = "; ".join(f"mkdir -p {os.path.dirname(p)} && printf '%s' '{t}' > {p}"
                       for p, t in contents.items())
    _ok(fresh, call("bash", command=script + "; printf 'needle\\0' > found/bin.dat"))
    counts = sorted((p, sum("needle" in line for line in t.split("\n")))
                    for p, t in contents.items() if "/." not in p)
    observation = _ok(fresh, call("search", search_term="needle", path="found"))
    lines = observation.split("\n")
    assert lines[0] == (f'{sum(c for _, c in counts)} matching lines for "needle" in '
                        f"{len(counts)} files under found:")
    assert lines[1:5] == [f"{p} ({c})" for p, c in counts[:4]]
    assert lines[5] == f"[{len(counts) - 4} more files not listed; search a more specific term or path]"
    # One file: its matching lines, numbered, capped.
    path, count = counts[0]
    observation = _ok(fresh, call("search", search_term="needle", path=path))
    hits = [(i, line) for i, line in enumerate(contents[path].split("\n"), 1) if "needle" in line]
    expected = [f'{count} matching lines for "needle" in {path}:'] + [
        f"{i:6d}\t{line}" for i, line in hits[:3]] + [
        f"[{count - 3} more matching lines not shown; search a more specific term]"]
    assert observation.split("\n")[:len(expected)] == expected
    assert 'no matches for "zzz_absent"' in _ok(fresh, call("search", search_term="zzz_absent"))
    assert "does not exist" in _ok(fresh, call("search", search_term="x", path="nowhere"))


def test_search_of_the_repository_matches_a_walk_of_the_workspace(fresh):
    root, term, counts = fresh._sandbox.workspace, "def ", []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in names:
            if not name.startswith("."):
                with open(os.path.join(top, name), encoding="utf-8") as f:
                    n = sum(term in line for line in f.read().split("\n"))
                if n:
                    counts.append((os.path.relpath(os.path.join(top, name), root), n))
    observation = _ok(fresh, call("search", search_term=term))
    listed = [line for line in observation.split("\n")[1:] if line.endswith(")")]
    assert listed == [f"{p} ({c})" for p, c in sorted(counts)] and len(counts) > 3


def test_every_tool_output_is_cut_in_the_middle_with_a_note():
    swe = SWEEnv(tasks=[TASK], max_observation_chars=301, command_timeout_s=30)
    try:
        swe.reset(seed=0)
        big = "".join(f"{i:05d}\n" for i in range(2000))  # 12000 characters
        _ok(swe, call("create", path="big.txt", file_text=big))
        outputs = {
            "bash": (_ok(swe, call("bash", command="cat big.txt")), big.rstrip("\n")),
            "view": (_ok(swe, call("view", path="big.txt")),
                     "\n".join(f"{i + 1:6d}\t{i:05d}" for i in range(2000))),
            "search": (_ok(swe, call("search", search_term="0", path="big.txt")), None),
        }
        for name, (observation, full) in outputs.items():
            body, _, status = observation.rpartition("\n")
            assert status == "[exit code: 0]", name
            head, note, tail = body.split("\n[... ", 1)[0], body.split("\n[... ", 1)[1], None
            omitted, _, rest = note.partition(" of ")
            total, _, tail = rest.partition(" characters omitted ...]\n")
            assert len(head) == 150 and len(tail) == 151, name
            assert int(omitted) == int(total) - 301, name
            if full is not None:
                assert int(total) == len(full) and head == full[:150] and tail == full[-151:]
        # Unparsable actions are cut the same way.
        step = swe.step("<function=" + "x" * 1000 + "></function>")
        assert step.info["invalid_action"] and "unknown tool" in step.observation
        assert " characters omitted ...]" in step.observation and len(step.observation) < 301 + 60
    finally:
        swe.close()


def test_truncate_middle_keeps_limit_characters_and_counts_the_cut():
    rng = random.Random(2)
    for _ in range(200):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randrange(0, 60)))
        limit = rng.randrange(1, 50)
        cut = tools.truncate_middle(text, limit)
        if len(text) <= limit:
            assert cut == text
            continue
        head, tail = limit // 2, limit - limit // 2
        note = f"\n[... {len(text) - limit} of {len(text)} characters omitted ...]\n"
        assert cut == text[:head] + note + text[len(text) - tail:]
    with pytest.raises(ValueError, match="limit must be a positive int"):
        tools.truncate_middle("abc", 0)


def test_a_file_too_long_for_one_call_is_refused_clearly(fresh):
    observation = _ok(fresh, call("create", path="huge.txt", file_text="x" * 200_000))
    assert "too long" in observation and "insert" in observation
    assert not os.path.exists(os.path.join(fresh._sandbox.workspace, "huge.txt"))


@pytest.mark.parametrize("overflow", ["score", "mask"])
def test_finish_scores_the_diff_so_far_and_mask_marks_it(overflow):
    swe = SWEEnv(tasks=[TASK], overflow=overflow, command_timeout_s=30, max_turns=2)
    try:
        swe.reset(seed=0)
        edit, submit = scripted.gold_actions(TASK)
        assert "submit" in submit
        _ok(swe, edit)
        step = swe.finish("the context is full")
        assert step.done and step.reward == 1.0 and step.info["success"] and step.info["truncated"]
        assert "cut short (the context is full)" in step.observation
        assert step.info.get("exclude_from_loss", False) == (overflow == "mask")
        again = swe.finish()
        assert again.done and again.reward == 0.0
        # The env's own turn limit is an episode cut short too.
        swe.reset(seed=0)
        _ok(swe, call("bash", command="true"))
        last = swe.step(call("bash", command="true"))
        assert last.done and last.info["truncated"] and last.reward == 0.0
        assert last.info.get("exclude_from_loss", False) == (overflow == "mask")
        # A submitted episode is never masked.
        swe.reset(seed=0)
        step = swe.step(submit)
        assert step.done and not step.info["truncated"] and "exclude_from_loss" not in step.info
    finally:
        swe.close()


def test_step_timeout_must_cover_evaluation_and_sandbox_start():
    swe = SWEEnv(tasks=[TASK], command_timeout_s=60, eval_timeout_s=300)
    assert swe.step_time_bound_s == 2 * 60 + 30 + 300 + 30
    with pytest.raises(ValueError, match=r"step_timeout_s=120\.0 .* must exceed step_time_bound_s=480"):
        SWEEnv(tasks=[TASK], command_timeout_s=60, eval_timeout_s=300, step_timeout_s=120.0)
    SWEEnv(tasks=[TASK], command_timeout_s=60, eval_timeout_s=300, step_timeout_s=481.0)
    for kwargs, message in ((dict(overflow="drop"), r"overflow must be one of \('score', 'mask'\)"),
                            (dict(sandbox_start_s=0), "sandbox_start_s must be positive"),
                            (dict(max_observation_chars=10.5), "max_observation_chars must be an int"),
                            (dict(system_prompt=3), "system_prompt must be a str")):
        with pytest.raises(ValueError, match=message):
            SWEEnv(tasks=[TASK], **kwargs)


@pytest.mark.parametrize("overflow", ["score", "mask"])
def test_collect_scores_or_masks_an_episode_the_rollout_cuts_short(overflow):
    """The gold edit, then the rollout's turns run out: finish evaluates the diff."""
    import jax

    from aem_jax.rollout import ChatFormat, EnvGroup, RolloutConfig, collect
    from tests.rollout.helpers import byte_level_tokenizer, scripted as scripted_policy

    edit, _ = scripted.gold_actions(TASK)
    tok = byte_level_tokenizer([tools.SYSTEM_PROMPT, TASK.problem_statement, edit] * 4)
    envs = []

    def make():
        envs.append(SWEEnv(tasks=[TASK], overflow=overflow, command_timeout_s=30))
        return envs[-1]

    config = RolloutConfig(num_tasks=1, group_size=1, max_turns=1, max_context_tokens=16384,
                           max_action_tokens=4096, step_timeout_s=1.0)
    try:
        batch, records, metrics = collect(EnvGroup(make), scripted_policy(lambda ctx: edit, tok),
                                          tok, config, key=jax.random.key(0), task_seeds=[0])
    finally:
        for swe in envs:
            swe.close()
    rec = records[0]
    assert not rec.failed and rec.truncated and rec.success and rec.turn_rewards == [1.0]
    assert rec.transcript[0] == {"role": "system", "content": tools.SYSTEM_PROMPT}
    assert metrics["step_timeout_s"] == envs[0].step_time_bound_s
    prompt = ChatFormat(tok, tools.SYSTEM_PROMPT).prompt_ids(rec.transcript[1]["content"])
    assert batch.tokens[0, :len(prompt)].tolist() == prompt
    masked = overflow == "mask"
    assert metrics["masked"] == int(masked)
    assert (batch.loss_mask.sum() == 0) == masked and batch.turn_valid[0, 0] == (not masked)
    assert batch.turn_rewards[0, 0] == 1.0
