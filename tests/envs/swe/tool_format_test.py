"""Tool calls in Qwen3's JSON format (<tool_call>{"name", "arguments"}</tool_call>) and XML."""
import json

import pytest

from aem_jax.envs.swe import SWEEnv, read_jsonl, scripted, tools
from aem_jax.envs.swe.dataset import LOCAL_TASKS
from tests.rollout.chat_templates_test import qwen3_tokenizer


def _json_call(name, **arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_json_calls_parse_to_the_same_calls_as_xml():
    cases = [("bash", {"command": 'grep -rn "def merge" .'}),
             ("str_replace", {"path": "a.py", "old_str": "  x = 1\n", "new_str": "  x = 2\n"}),
             ("create", {"path": "b.py", "file_text": "print('\\u00e9')\n"}),
             ("view", {"path": "a.py", "view_range": "3,-1"}),
             ("submit", {})]
    for name, args in cases:
        xml = scripted.call(name, **args)
        assert tools.parse_action(_json_call(name, **args)) == tools.parse_action(xml) \
            == tools.ToolCall(name, args)


def test_json_call_variants():
    parse = tools.parse_action
    # Reasoning and prose around the call; no closing tag (cut by a stop string).
    text = ('<think>\nI will list files; e.g. <tool_call> is the format.\n</think>\n\nLet me look.'
            '\n<tool_call>\n{"name": "bash", "arguments": {"command": "ls -la"}}')
    assert parse(text) == tools.ToolCall("bash", {"command": "ls -la"})
    # Numbers and number lists become the text the tools take.
    assert parse('<tool_call>{"name": "view", "arguments": {"path": "a.py", '
                 '"view_range": [10, -1]}}</tool_call>').params["view_range"] == "10,-1"
    assert parse('<tool_call>{"name": "bash", "arguments": {"command": 7}}</tool_call>') \
        .params == {"command": "7"}
    # OpenAI style (arguments as a JSON string), Llama style ("parameters"), no arguments.
    encoded = json.dumps({"name": "bash", "arguments": json.dumps({"command": "pwd"})})
    assert parse(f"<tool_call>{encoded}</tool_call>").params == {"command": "pwd"}
    assert parse('<tool_call>{"name": "bash", "parameters": {"command": "pwd"}}</tool_call>') \
        .params == {"command": "pwd"}
    for args in ("", ', "arguments": {}', ', "arguments": null', ', "arguments": ""'):
        assert parse('<tool_call>{"name": "submit"%s}</tool_call>' % args).name == "submit"
    # The first call in the text is the action, whichever its format.
    xml = "<function=bash>\n<parameter=command>pwd</parameter>\n</function>"
    js = _json_call("bash", command="ls")
    assert parse(xml + js).params == {"command": "pwd"}
    assert parse(js + xml).params == {"command": "ls"}
    # Qwen3-Coder's XML inside <tool_call> tags is still XML.
    assert parse(f"<tool_call>\n{xml}\n</tool_call>").params == {"command": "pwd"}


@pytest.mark.parametrize("text, message", [
    ('<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}\n</tool_call>',
     r"does not hold valid JSON \(Expecting ',' delimiter"),
    ("<tool_call>{'name': 'bash', 'arguments': {'command': 'ls'}}</tool_call>",
     "does not hold valid JSON"),
    ('<tool_call>{"arguments": {"command": "ls"}}</tool_call>', 'a "name" string'),
    ('<tool_call>{"name": "bash", "arguments": ["ls"]}</tool_call>', '"arguments" must be an object'),
    ('<tool_call>{"name": "bash", "arguments": "{ls"}</tool_call>', "arguments string is not valid JSON"),
    ('<tool_call>{"name": "bash", "arguments": {"command": {"a": 1}}}</tool_call>',
     "parameter 'command' must be a string"),
    ('<tool_call>{"name": "bash", "arguments": {"command": true}}</tool_call>', "must be a string"),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "unknown tool 'rm_rf'"),
    ('<tool_call>{"name": "str_replace", "arguments": {"path": "a"}}</tool_call>', "needs parameter"),
    ('<tool_call>{"name": "view", "arguments": {"path": "a", "x": "1"}}</tool_call>', "no parameter"),
    ("<tool_call>bash ls</tool_call>", "neither a JSON object nor <function=NAME>"),
])
def test_malformed_json_calls_explain(text, message):
    with pytest.raises(tools.ActionError, match=message) as err:
        tools.parse_action(text)
    if "JSON" in message:  # the message shows a well-formed call to copy
        assert '{"name": "bash", "arguments": {"command": "ls"}}' in str(err.value)


def test_the_qwen3_template_teaches_the_format_the_parser_reads():
    tok = qwen3_tokenizer()
    schemas = tools.tool_schemas()
    assert [s["function"]["name"] for s in schemas] == list(tools.TOOLS)
    for schema in schemas:
        required, optional = tools.TOOLS[schema["function"]["name"]]
        assert schema["function"]["parameters"]["required"] == list(required)
        assert list(schema["function"]["parameters"]["properties"]) == list(required + optional)
    call = {"name": "str_replace", "arguments": {"path": "a.py", "old_str": 'x = "1"',
                                                 "new_str": "x = 2"}}
    text = tok.apply_chat_template(
        [{"role": "user", "content": "fix it"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}],
        tools=schemas, tokenize=False)
    # The system message lists the tools and asks for <tool_call> JSON ...
    assert '"name": "str_replace"' in text and "<tool_call>\n{\"name\": <function-name>" in text
    # ... and the template's own rendering of a call parses back to it.
    answer = text.split("<|im_start|>assistant\n")[-1]
    assert tools.parse_action(answer) == tools.ToolCall("str_replace", call["arguments"])


def _as_json(action):
    call = tools.parse_action(action)
    return "I will call a tool.\n" + _json_call(call.name, **call.params)


def _play(env, actions):
    env.reset(seed=0)
    steps = []
    for action in actions:
        steps.append(env.step(action))
        if steps[-1].done:
            return steps
    raise AssertionError("the actions did not end the episode")


def test_json_actions_drive_the_env_and_malformed_ones_are_invalid():
    task = read_jsonl(LOCAL_TASKS)[0]
    env = SWEEnv(tasks=[task], max_turns=40, command_timeout_s=30, max_processes=128)
    try:
        env.reset(seed=0)
        step = env.step('<tool_call>{"name": "bash", "arguments": {"command": "echo hi"</tool_call>')
        assert step.info["invalid_action"] and not step.done
        assert "valid JSON" in step.observation
        step = env.step(_json_call("bash", command="echo hi"))
        assert not step.info["invalid_action"] and step.observation.startswith("hi\n")
        # The gold patch played as JSON calls is the same episode as played in XML.
        xml = scripted.gold_actions(task)
        by_xml, by_json = _play(env, xml), _play(env, [_as_json(a) for a in xml])
        assert len(by_xml) == len(by_json) >= 2
        for a, b in zip(by_xml[:-1], by_json[:-1]):
            assert not b.info["invalid_action"] and a.observation == b.observation
        assert by_json[-1].reward == by_xml[-1].reward
        assert by_json[-1].info["success"] == by_xml[-1].info["success"]
    finally:
        env.close()
