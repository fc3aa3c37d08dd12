/*
 * tests/serve/test_srv_chat.c — chat templates (serve/srv_chat.c): each
 * supported family, recognised from the template text its models ship,
 * renders a conversation to exactly the prompt the Jinja template gives
 * (golden strings); unknown templates and malformed conversations are
 * refused with a message naming the message at fault.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "serve/srv_chat.h"

#include <stdlib.h>
#include <string.h>

/* The templates as the model files carry them (abridged only where the
 * omitted part is tool calling, which is not rendered). */
static const char LLAMA3[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
    "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

static const char LLAMA31[] =
    "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul "
    "2024\" %}\n{%- endif %}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set "
    "system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- "
    "else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- "
    "\"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Cutting Knowledge Date: "
    "December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{{- "
    "system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n{{- "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";

static const char LLAMA2[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
    "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set "
    "system_message = false %}{% endif %}{% for message in loop_messages %}{% if "
    "(message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
    "roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == "
    "0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] "
    "%}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() "
    "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + "
    "eos_token }}{% endif %}{% endfor %}";

static const char MISTRAL_V2[] =
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ "
    "'[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
    "message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}";

static const char MISTRAL_V1[] =
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' "
    "+ message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
    "message['content'] + eos_token + ' ' }}{% endif %}{% endfor %}";

static const char QWEN25[] =
    "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + "
    "messages[0]['content'] + '<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou "
    "are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n{%- endif "
    "%}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role "
    "== \"system\" and not loop.first) or (message.role == \"assistant\") %}\n        {{- "
    "'<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- "
    "endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' "
    "}}\n{%- endif %}\n";

static const char CHATML[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\\n' }}{% endif %}";

static const srv_chat_msg_t CONV[] = {
    {"system", "You are terse."},
    {"user", "Hi"},
    {"assistant", "Hello!"},
    {"user", "What is 2+2? "},
};
#define N_CONV (sizeof CONV / sizeof CONV[0])

static void
expect(const char *tmpl, const char *bos, const char *eos, const srv_chat_msg_t *m, size_t n,
       srv_chat_kind_t kind, const char *want)
{
    srv_chat_t c;
    char err[256] = "";
    int rc = srv_chat_detect(tmpl, bos, eos, &c, err, sizeof err);
    if (rc)
        print_error("detect: %s\n", err);
    assert_int_equal(rc, 0);
    assert_int_equal(c.kind, kind);
    char *got = NULL;
    size_t *plain = NULL, n_plain = 0;
    rc = srv_chat_render(&c, m, n, true, &got, &plain, &n_plain, err, sizeof err);
    if (rc)
        print_error("render: %s\n", err);
    assert_int_equal(rc, 0);
    if (strcmp(got, want) != 0) {
        print_error("got:  [%s]\nwant: [%s]\n", got, want);
        fail();
    }
    /* The plain ranges are the messages' content, in order (trimmed where
     * the template trims it), and nothing else. */
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        size_t b = 0, e = strlen(m[i].content);
        while (b < e && strchr(" \t\n\r\f\v", m[i].content[b]))
            b++;
        while (e > b && strchr(" \t\n\r\f\v", m[i].content[e - 1]))
            e--;
        if (b == e)
            continue;
        assert_true(k < n_plain);
        const char *at = got + plain[2 * k];
        size_t len = plain[2 * k + 1] - plain[2 * k];
        assert_true(len >= e - b && len <= strlen(m[i].content));
        assert_non_null(memmem(at, len, m[i].content + b, e - b));
        assert_true(k == 0 || plain[2 * k] >= plain[2 * k - 1]);
        k++;
    }
    assert_int_equal(k, n_plain);
    free(plain);
    free(got);
    srv_chat_free(&c);
}

static void
test_llama3(void **state)
{
    (void)state;
    expect(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", CONV, N_CONV, SRV_CHAT_LLAMA3,
           "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are "
           "terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_"
           "header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|"
           "end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_"
           "id|>\n\n");
}

static void
test_llama31(void **state)
{
    (void)state;
    expect(LLAMA31, "<|begin_of_text|>", "<|eot_id|>", CONV, N_CONV, SRV_CHAT_LLAMA31,
           "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
           "Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are "
           "terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_"
           "header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|"
           "end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_"
           "id|>\n\n");
    /* Without a system message the header is still there, empty. */
    expect(LLAMA31, "<|begin_of_text|>", "<|eot_id|>", CONV + 1, 1, SRV_CHAT_LLAMA31,
           "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
           "Date: December 2023\nToday Date: 26 Jul "
           "2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_"
           "header_id|>assistant<|end_header_id|>\n\n");
}

static void
test_llama2(void **state)
{
    (void)state;
    expect(LLAMA2, "<s>", "</s>", CONV, N_CONV, SRV_CHAT_LLAMA2,
           "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] What "
           "is 2+2? [/INST]"); /* The template strips the system block and the user text as one: an
                                * empty first message takes the block's closing newlines with it. */
    const srv_chat_msg_t blank[] = {{"system", "Be brief."}, {"user", " \n"}};
    expect(LLAMA2, "<s>", "</s>", blank, 2, SRV_CHAT_LLAMA2,
           "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>> [/INST]");
}

static void
test_mistral(void **state)
{
    (void)state;
    expect(MISTRAL_V2, "<s>", "</s>", CONV + 1, N_CONV - 1, SRV_CHAT_MISTRAL,
           "<s>[INST] Hi [/INST]Hello!</s>[INST] What is 2+2?  [/INST]");
    expect(MISTRAL_V1, "<s>", "</s>", CONV + 1, N_CONV - 1, SRV_CHAT_MISTRAL,
           "<s>[INST] Hi [/INST]Hello!</s> [INST] What is 2+2?  [/INST]");
}

static void
test_chatml(void **state)
{
    (void)state;
    expect(QWEN25, "", "<|im_end|>", CONV, N_CONV, SRV_CHAT_CHATML,
           "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_"
           "start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2? "
           "<|im_end|>\n<|im_start|>assistant\n");
    /* Qwen2.5's default system message when the conversation has none. */
    expect(QWEN25, "", "<|im_end|>", CONV + 1, 1, SRV_CHAT_CHATML,
           "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
           "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    /* Plain ChatML has none. */
    expect(CHATML, "", "<|im_end|>", CONV + 1, 1, SRV_CHAT_CHATML,
           "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

/* A 1 MB template (a model file's, or --chat-template's) full of
 * '<|im_start|>system\n' marks behind escaped quotes, in a literal never
 * closed: each mark's literal runs to the end, which detection once read
 * again for every mark.  The default system message after it, in the other
 * quote, is still found. */
static void
test_chatml_large(void **state)
{
    (void)state;
    static const char head[] = "<|im_start|><|im_end|>{{ '", unit[] = "<|im_start|>system\\n\\'",
                      tail[] = "<|im_end|> }}{{ \"<|im_start|>system\\nYou are big.<|im_end|>\" }}";
    size_t n_units = (1u << 20) / (sizeof unit - 1), len = 0;
    char *t = malloc(sizeof head + n_units * (sizeof unit - 1) + sizeof tail);
    assert_non_null(t);
    memcpy(t, head, sizeof head - 1);
    len = sizeof head - 1;
    for (size_t i = 0; i < n_units; i++, len += sizeof unit - 1)
        memcpy(t + len, unit, sizeof unit - 1);
    memcpy(t + len, tail, sizeof tail);
    srv_chat_t c;
    char err[256] = "";
    assert_int_equal(srv_chat_detect(t, "", "<|im_end|>", &c, err, sizeof err), 0);
    assert_int_equal(c.kind, SRV_CHAT_CHATML);
    assert_non_null(c.default_system);
    assert_string_equal(c.default_system, "You are big.");
    srv_chat_free(&c);
    /* Closed, the first literal is the message, marks and all. */
    memcpy(t + len - 2, "<|im_end|>'", sizeof "<|im_end|>'");
    assert_int_equal(srv_chat_detect(t, "", "<|im_end|>", &c, err, sizeof err), 0);
    assert_non_null(c.default_system);
    assert_int_equal(strlen(c.default_system), 20 * (n_units - 1));
    srv_chat_free(&c);
    free(t);
}

/* A family by name renders as that family's real template does; with
 * the families' own special tokens. */
static void
render_both(const char *name, const char *real, const char *bos, const char *eos,
            const srv_chat_msg_t *m, size_t n)
{
    const char *stand_in = srv_chat_builtin(name);
    assert_non_null(stand_in);
    char *out[2] = {NULL, NULL}, err[256] = "";
    srv_chat_kind_t kinds[2];
    const char *tmpls[2] = {stand_in, real};
    for (int i = 0; i < 2; i++) {
        srv_chat_t c;
        assert_int_equal(srv_chat_detect(tmpls[i], bos, eos, &c, err, sizeof err), 0);
        kinds[i] = c.kind;
        assert_int_equal(srv_chat_render(&c, m, n, true, &out[i], NULL, NULL, err, sizeof err), 0);
        srv_chat_free(&c);
    }
    assert_int_equal(kinds[0], kinds[1]);
    if (strcmp(out[0], out[1]) != 0) {
        print_error("%s by name: [%s]\ntemplate:     [%s]\n", name, out[0], out[1]);
        fail();
    }
    free(out[0]);
    free(out[1]);
}

static void
test_builtin(void **state)
{
    (void)state;
    render_both("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", CONV, N_CONV);
    render_both("llama3.1", LLAMA31, "<|begin_of_text|>", "<|eot_id|>", CONV, N_CONV);
    render_both("llama3.1", LLAMA31, "<|begin_of_text|>", "<|eot_id|>", CONV + 1, 1);
    render_both("llama2", LLAMA2, "<s>", "</s>", CONV, N_CONV);
    render_both("mistral", MISTRAL_V2, "<s>", "</s>", CONV + 1, N_CONV - 1);
    render_both("chatml", CHATML, "", "<|im_end|>", CONV, N_CONV);
    render_both("chatml", CHATML, "", "<|im_end|>", CONV + 1, 1);
    assert_null(srv_chat_builtin("phi3"));
    assert_null(srv_chat_builtin(""));
    assert_null(srv_chat_builtin(NULL));
    assert_non_null(strstr(SRV_CHAT_NAMES, "chatml"));
}

static void
refused(const char *tmpl, const srv_chat_msg_t *m, size_t n, const char *needle)
{
    srv_chat_t c;
    char err[256] = "";
    int rc = srv_chat_detect(tmpl, "<s>", "</s>", &c, err, sizeof err);
    if (rc == 0) {
        char *out = NULL;
        rc = srv_chat_render(&c, m, n, true, &out, NULL, NULL, err, sizeof err);
        free(out);
        srv_chat_free(&c);
    }
    assert_int_not_equal(rc, 0);
    if (strstr(err, needle) == NULL) {
        print_error("message '%s' does not mention '%s'\n", err, needle);
        fail();
    }
}

static void
test_refusals(void **state)
{
    (void)state;
    static const srv_chat_msg_t bad_role[] = {{"user", "a"}, {"tool", "b"}};
    static const srv_chat_msg_t late_system[] = {{"user", "a"}, {"system", "b"}};
    static const srv_chat_msg_t two_users[] = {{"user", "a"}, {"user", "b"}};
    static const srv_chat_msg_t ends_assistant[] = {{"user", "a"}, {"assistant", "b"}};
    refused("{{ messages | tojson }}", CONV, N_CONV, "chat template");
    refused("", CONV, N_CONV, "no chat template");
    refused(LLAMA3, bad_role, 2, "messages[1].role");
    refused(LLAMA3, late_system, 2, "messages[1].role");
    refused(LLAMA3, CONV, 0, "messages");
    refused(LLAMA2, two_users, 2, "messages[1].role");
    refused(MISTRAL_V2, CONV, N_CONV, "messages[0].role");
    refused(MISTRAL_V2, ends_assistant, 2, "messages[1].role");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama3),  cmocka_unit_test(test_llama31),
        cmocka_unit_test(test_llama2),  cmocka_unit_test(test_mistral),
        cmocka_unit_test(test_chatml),  cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_builtin), cmocka_unit_test(test_chatml_large),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
