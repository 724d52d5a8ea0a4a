"""A Qwen3-style tokenizer directory for tests: minimind's tokenizer.json (ChatML specials, <think> and </think> as
added tokens) with a chat template written here for these tests, having the features of Qwen3's: an optional leading
system turn, <|im_start|>role ... <|im_end|> turns, the reasoning of assistant turns after the last user message shown
in a <think></think> block (from `reasoning_content` or a <think> block inside the content; earlier turns lose it),
and a generation prompt that, when `enable_thinking` is given and false, opens with an empty think block. Like Qwen3's
tokenizer_config, there is no BOS token and <|im_end|> is the EOS token."""
import json
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMIND = os.path.join(ROOT, "data", "minimind_tokenizer")

QWEN3_STYLE_TEMPLATE = """{%- set state = namespace(last_user=-1) -%}
{%- for turn in messages -%}
    {%- if turn.role == 'user' -%}{%- set state.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for turn in messages -%}
    {%- if turn.role == 'system' and not loop.first -%}
        {{- raise_exception('a system turn may only open the conversation') -}}
    {%- endif -%}
    {%- if turn.role == 'assistant' -%}
        {%- set said = turn.content -%}
        {%- set thought = turn.reasoning_content if turn.reasoning_content is string else '' -%}
        {%- if '</think>' in said -%}
            {%- set thought = said.split('</think>')[0].split('<think>')[-1] -%}
            {%- set said = said.split('</think>')[-1] -%}
        {%- endif -%}
        {{- '<|im_start|>assistant\\n' -}}
        {%- if loop.index0 > state.last_user -%}
            {{- '<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' -}}
        {%- endif -%}
        {{- said.lstrip('\\n') + '<|im_end|>\\n' -}}
    {%- else -%}
        {{- '<|im_start|>' + turn.role + '\\n' + turn.content + '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
    {%- if enable_thinking is defined and not enable_thinking -%}
        {{- '<think>\\n\\n</think>\\n\\n' -}}
    {%- endif -%}
{%- endif -%}"""


def write_qwen3_style_tokenizer(directory):
    """tokenizer.json + tokenizer_config.json (6,400 ids) into `directory`; returns it."""
    os.makedirs(directory, exist_ok=True)
    shutil.copyfile(os.path.join(MINIMIND, "tokenizer.json"), os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(MINIMIND, "tokenizer_config.json")) as f:
        config = json.load(f)
    config.update(chat_template=QWEN3_STYLE_TEMPLATE, bos_token=None, eos_token="<|im_end|>",
                  pad_token="<|endoftext|>")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return directory
