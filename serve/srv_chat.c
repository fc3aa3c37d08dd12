/*
 * serve/srv_chat.c — chat messages rendered into the prompt text a model was
 * trained on, for the template families kvserve knows: Llama 3 (and 3.1's
 * knowledge-date header), Llama 2 ([INST] with <<SYS>>), Mistral ([INST]
 * without a system role) and ChatML (Qwen).  Called by the request
 * validation (srv_req.c) when a Generate carries messages.
 *
 * The GGUF carries a Jinja template (tokenizer.chat_template); running
 * Jinja would mean an interpreter in the server.  Instead the family is
 * recognised by markers only its templates contain, and an unrecognised
 * template is refused: a wrongly rendered prompt degrades answers silently.
 */
#include "srv_chat.h"

#include "srv.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Where message content lies in a rendered prompt: byte ranges, in order,
 * that the tokenizer reads without control tokens (srv_chat_render). */
typedef struct spans {
    size_t *r; /* [2 * n]: begin, end */
    size_t n, cap;
    bool oom;
} spans_t;

/* Message content: appended, and its range noted. */
static void
put_content(srv_buf_t *b, spans_t *sp, const char *s, size_t n)
{
    size_t at = b->len;
    srv_buf_put(b, s, n);
    if (b->len == at)
        return;
    if (sp->n == sp->cap) {
        size_t nc = sp->cap ? 2 * sp->cap : 16;
        size_t *r = realloc(sp->r, 2 * nc * sizeof *r);
        if (r == NULL) {
            sp->oom = true;
            return;
        }
        sp->r = r;
        sp->cap = nc;
    }
    sp->r[2 * sp->n] = at;
    sp->r[2 * sp->n + 1] = b->len;
    sp->n++;
}

/* Jinja's |trim and Python's str.strip(): ASCII whitespace at both ends. */
static void
put_trimmed(srv_buf_t *b, spans_t *sp, const char *s)
{
    size_t n = strlen(s);
    while (n && strchr(" \t\n\r\f\v", s[n - 1]))
        n--;
    while (n && strchr(" \t\n\r\f\v", *s)) {
        s++;
        n--;
    }
    put_content(b, sp, s, n);
}

/* A Jinja string literal's body ("\n" escapes) starting at s, up to the
 * quote q; malloc'd, or NULL. */
static char *
literal(const char *s, char q)
{
    srv_buf_t b = {0};
    for (; *s && *s != q; s++) {
        if (*s == '\\' && s[1]) {
            s++;
            char c = *s == 'n' ? '\n' : *s == 't' ? '\t' : *s;
            srv_buf_put(&b, &c, 1);
        } else {
            srv_buf_put(&b, s, 1);
        }
    }
    if (*s != q || b.oom) {
        free(b.p);
        return NULL;
    }
    if (b.p == NULL)
        return calloc(1, 1);
    return b.p;
}

static const char im_end[] = "<|im_end|>";

/* ChatML's default system message: the body of the literal that starts at s
 * and is closed by q, up to its first <|im_end|>; malloc'd when that is
 * non-empty and the literal is closed, else NULL.  When the literal holds
 * no such message, *end is where its reading stopped (the closing quote or
 * the template's end), else NULL.  A later mark before *end sits behind an
 * escaped quote of this literal, so its literal is a suffix of this one with
 * no message either: the caller skips it, and a crafted template full of
 * marks is read once instead of once per mark. */
static char *
system_literal(const char *s, char q, const char **end)
{
    const size_t n_end = sizeof im_end - 1;
    srv_buf_t b = {0};
    bool found = false;
    *end = NULL;
    for (; *s && *s != q && !found; s++) {
        char c = *s;
        if (c == '\\' && s[1]) {
            s++;
            c = *s == 'n' ? '\n' : *s == 't' ? '\t' : *s;
        }
        srv_buf_put(&b, &c, 1);
        found = c == '>' && b.len >= n_end && memcmp(b.p + b.len - n_end, im_end, n_end) == 0;
    }
    if (found && b.len == n_end) { /* the message's content follows */
        free(b.p);
        return NULL;
    }
    for (; found && *s && *s != q; s++) /* the literal must still be closed */
        if (*s == '\\' && s[1])
            s++;
    if (!found || *s != q || b.oom) {
        *end = s;
        free(b.p);
        return NULL;
    }
    b.p[b.len - n_end] = '\0';
    return b.p;
}

int
srv_chat_detect(const char *tmpl, const char *bos, const char *eos, srv_chat_t *out, char *err,
                size_t cap)
{
    memset(out, 0, sizeof *out);
    snprintf(out->bos, sizeof out->bos, "%s", bos ? bos : "");
    snprintf(out->eos, sizeof out->eos, "%s", eos ? eos : "");
    if (tmpl == NULL || tmpl[0] == '\0') {
        snprintf(err, cap, "messages: the model has no chat template (tokenizer.chat_template)");
        return KVS_ENOTSUP;
    }
    if (strstr(tmpl, "<|start_header_id|>") && strstr(tmpl, "<|eot_id|>")) {
        out->kind = SRV_CHAT_LLAMA3;
        const char *k = strstr(tmpl, "Cutting Knowledge Date: ");
        if (k) {
            out->kind = SRV_CHAT_LLAMA31;
            /* The template's default date, e.g. set date_string = "26 Jul 2024". */
            const char *d = strstr(tmpl, "date_string = \"");
            char *lit = d ? literal(d + strlen("date_string = \""), '"') : NULL;
            if (lit)
                snprintf(out->date, sizeof out->date, "%s", lit);
            else {
                time_t t = time(NULL);
                struct tm tm;
                gmtime_r(&t, &tm);
                strftime(out->date, sizeof out->date, "%d %b %Y", &tm);
            }
            free(lit);
        }
        return 0;
    }
    if (strstr(tmpl, "<|im_start|>") && strstr(tmpl, "<|im_end|>")) {
        out->kind = SRV_CHAT_CHATML;
        /* A default system message (Qwen2/2.5): a literal right after
         * '<|im_start|>system\n' that is not followed by message content. */
        static const char mark[] = "<|im_start|>system\\n";
        const char *p = tmpl, *read_to[2] = {tmpl, tmpl}; /* per quote, see system_literal */
        while ((p = strstr(p, mark)) != NULL) {
            char q = p > tmpl ? p[-1] : '\0'; /* the literal's quote */
            p += sizeof mark - 1;
            if (q != '\'' && q != '"')
                continue;
            const char **seen = &read_to[q == '"'];
            if (p - sizeof mark < *seen)
                continue;
            const char *end;
            out->default_system = system_literal(p, q, &end);
            if (out->default_system)
                break;
            if (end)
                *seen = end;
        }
        return 0;
    }
    if (strstr(tmpl, "[INST]") && strstr(tmpl, "[/INST]")) {
        if (strstr(tmpl, "<<SYS>>")) {
            out->kind = SRV_CHAT_LLAMA2;
        } else {
            out->kind = SRV_CHAT_MISTRAL;
            /* Mistral v0.1 puts a space after each answer's EOS. */
            out->space_after_eos = strstr(tmpl, "eos_token + ' '") != NULL;
        }
        return 0;
    }
    snprintf(err, cap,
             "messages: the model's chat template is not one kvserve can render (Llama 3, "
             "Llama 2, Mistral, ChatML); send a text prompt instead");
    return KVS_ENOTSUP;
}

const char *
srv_chat_builtin(const char *name)
{
    /* Each family's markers, as srv_chat_detect looks for them. */
    static const struct {
        const char *name, *tmpl;
    } builtin[] = {
        {"llama3", "<|start_header_id|><|end_header_id|><|eot_id|>"},
        {"llama3.1", "<|start_header_id|><|end_header_id|><|eot_id|>Cutting Knowledge Date: "
                     "{%- set date_string = \"26 Jul 2024\" %}"},
        {"llama2", "[INST] <<SYS>> <</SYS>> [/INST]"},
        {"mistral", "[INST] [/INST]"},
        {"chatml", "<|im_start|><|im_end|>"},
    };
    for (size_t i = 0; name != NULL && i < sizeof builtin / sizeof builtin[0]; i++)
        if (strcmp(name, builtin[i].name) == 0)
            return builtin[i].tmpl;
    return NULL;
}

void
srv_chat_free(srv_chat_t *c)
{
    free(c->default_system);
    c->default_system = NULL;
}

static int
bad(char *err, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
    return KVS_EINVAL;
}

/* [INST] families: an optional system message, then user and assistant
 * strictly alternating from a user message, as their templates demand. */
static int
check_alternation(const srv_chat_msg_t *m, size_t n, bool system_ok, char *err, size_t cap)
{
    size_t i = 0;
    if (n && strcmp(m[0].role, "system") == 0) {
        if (!system_ok)
            return bad(err, cap, "messages[0].role: this model's template has no system role");
        i = 1;
    }
    for (size_t k = 0; i < n; i++, k++) {
        const char *want = k % 2 == 0 ? "user" : "assistant";
        if (strcmp(m[i].role, want) != 0)
            return bad(err, cap,
                       "messages[%zu].role: '%s', expected '%s' (user and assistant "
                       "must alternate)",
                       i, m[i].role, want);
    }
    return 0;
}

int
srv_chat_render(const srv_chat_t *c, const srv_chat_msg_t *m, size_t n, bool add_generation_prompt,
                char **out, size_t **plain, size_t *n_plain, char *err, size_t cap)
{
    *out = NULL;
    if (plain) {
        *plain = NULL;
        *n_plain = 0;
    }
    if (n == 0)
        return bad(err, cap, "messages: empty");
    for (size_t i = 0; i < n; i++) {
        const char *r = m[i].role;
        if (!r || (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant")))
            return bad(err, cap, "messages[%zu].role: '%s', expected system, user or assistant", i,
                       r ? r : "");
        if (i > 0 && strcmp(r, "system") == 0)
            return bad(err, cap, "messages[%zu].role: a system message must come first", i);
        if (m[i].content == NULL)
            return bad(err, cap, "messages[%zu].content: missing", i);
    }
    srv_buf_t b = {0};
    spans_t sp = {0};
    int rc = 0;
    switch (c->kind) {
    case SRV_CHAT_LLAMA3:
    case SRV_CHAT_LLAMA31: {
        srv_buf_puts(&b, c->bos);
        size_t i = 0;
        if (c->kind == SRV_CHAT_LLAMA31) {
            /* 3.1 always opens with a system header carrying the dates. */
            srv_buf_puts(&b, "<|start_header_id|>system<|end_header_id|>\n\n"
                             "Cutting Knowledge Date: December 2023\nToday Date: ");
            srv_buf_puts(&b, c->date);
            srv_buf_puts(&b, "\n\n");
            if (strcmp(m[0].role, "system") == 0) {
                put_trimmed(&b, &sp, m[0].content);
                i = 1;
            }
            srv_buf_puts(&b, "<|eot_id|>");
        }
        for (; i < n; i++) {
            srv_buf_puts(&b, "<|start_header_id|>");
            srv_buf_puts(&b, m[i].role);
            srv_buf_puts(&b, "<|end_header_id|>\n\n");
            put_trimmed(&b, &sp, m[i].content);
            srv_buf_puts(&b, "<|eot_id|>");
        }
        if (add_generation_prompt)
            srv_buf_puts(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    }
    case SRV_CHAT_CHATML: {
        if (strcmp(m[0].role, "system") != 0 && c->default_system) {
            srv_buf_puts(&b, "<|im_start|>system\n");
            srv_buf_puts(&b, c->default_system);
            srv_buf_puts(&b, "<|im_end|>\n");
        }
        for (size_t i = 0; i < n; i++) {
            srv_buf_puts(&b, "<|im_start|>");
            srv_buf_puts(&b, m[i].role);
            srv_buf_puts(&b, "\n");
            put_content(&b, &sp, m[i].content, strlen(m[i].content));
            srv_buf_puts(&b, "<|im_end|>\n");
        }
        if (add_generation_prompt)
            srv_buf_puts(&b, "<|im_start|>assistant\n");
        break;
    }
    case SRV_CHAT_LLAMA2: {
        if ((rc = check_alternation(m, n, true, err, cap)))
            break;
        size_t i = 0;
        const char *sys = NULL;
        if (strcmp(m[0].role, "system") == 0) {
            sys = m[0].content;
            i = 1;
        }
        for (bool first = true; i < n; i++, first = false) {
            if (strcmp(m[i].role, "user") == 0) {
                srv_buf_puts(&b, c->bos);
                srv_buf_puts(&b, "[INST] ");
                if (first && sys) {
                    /* The template strips the whole content, system block
                     * included: only the user text's tail is trimmed. */
                    srv_buf_puts(&b, "<<SYS>>\n");
                    put_content(&b, &sp, sys, strlen(sys));
                    srv_buf_puts(&b, "\n<</SYS>>\n\n");
                    size_t k = strlen(m[i].content);
                    while (k && strchr(" \t\n\r\f\v", m[i].content[k - 1]))
                        k--;
                    put_content(&b, &sp, m[i].content, k);
                    /* With nothing after it, the strip reaches the block's
                     * own closing newlines. */
                    while (k == 0 && b.len && b.p[b.len - 1] == '\n')
                        b.p[--b.len] = '\0';
                } else {
                    put_trimmed(&b, &sp, m[i].content);
                }
                srv_buf_puts(&b, " [/INST]");
            } else {
                srv_buf_puts(&b, " ");
                put_trimmed(&b, &sp, m[i].content);
                srv_buf_puts(&b, " ");
                srv_buf_puts(&b, c->eos);
            }
        }
        break;
    }
    case SRV_CHAT_MISTRAL: {
        if ((rc = check_alternation(m, n, false, err, cap)))
            break;
        srv_buf_puts(&b, c->bos);
        for (size_t i = 0; i < n; i++) {
            if (strcmp(m[i].role, "user") == 0) {
                srv_buf_puts(&b, "[INST] ");
                put_content(&b, &sp, m[i].content, strlen(m[i].content));
                srv_buf_puts(&b, " [/INST]");
            } else {
                put_content(&b, &sp, m[i].content, strlen(m[i].content));
                srv_buf_puts(&b, c->eos);
                if (c->space_after_eos)
                    srv_buf_puts(&b, " ");
            }
        }
        break;
    }
    default:
        rc = bad(err, cap, "messages: no chat template");
    }
    if (rc == 0 && (c->kind == SRV_CHAT_LLAMA2 || c->kind == SRV_CHAT_MISTRAL) &&
        strcmp(m[n - 1].role, "user") != 0)
        rc = bad(err, cap, "messages[%zu].role: the last message must be the user's", n - 1);
    if (rc == 0 && (b.oom || sp.oom))
        rc = KVS_ENOMEM;
    if (rc == 0 && (*out = b.p ? b.p : calloc(1, 1)) == NULL)
        rc = KVS_ENOMEM;
    if (rc) {
        free(b.p);
        free(sp.r);
        return rc;
    }
    if (plain) {
        *plain = sp.r;
        *n_plain = sp.n;
    } else {
        free(sp.r);
    }
    return 0;
}
