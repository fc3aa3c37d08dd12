/*
 * serve/srv_chat.h — chat templates (srv_chat.c): which family a model's
 * tokenizer.chat_template belongs to, and messages rendered to its prompt.
 */
#ifndef SRV_CHAT_H
#define SRV_CHAT_H

#include "base/kvs.h"

#include <stdbool.h>
#include <stddef.h>

typedef enum srv_chat_kind {
    SRV_CHAT_NONE = 0,
    SRV_CHAT_LLAMA3,  /* <|start_header_id|>role<|end_header_id|>\n\n ... <|eot_id|> */
    SRV_CHAT_LLAMA31, /* the same, opened by a system header with knowledge dates */
    SRV_CHAT_LLAMA2,  /* <s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s> */
    SRV_CHAT_MISTRAL, /* <s>[INST] user [/INST]answer</s>, no system role */
    SRV_CHAT_CHATML,  /* <|im_start|>role\n ... <|im_end|>\n (Qwen) */
} srv_chat_kind_t;

typedef struct srv_chat {
    srv_chat_kind_t kind;
    char bos[64], eos[64]; /* the special tokens' text, as the template writes them */
    char date[32];         /* LLAMA31: "Today Date" */
    char *default_system;  /* CHATML: the system message used when none is given */
    bool space_after_eos;  /* MISTRAL v0.1 */
} srv_chat_t;

typedef struct srv_chat_msg {
    const char *role; /* "system" (first only), "user" or "assistant" */
    const char *content;
} srv_chat_msg_t;

/* Recognises the template; KVS_ENOTSUP (no template, or an unknown one)
 * with err saying so.  Free with srv_chat_free. */
int srv_chat_detect(const char *tmpl, const char *bos, const char *eos, srv_chat_t *out, char *err,
                    size_t cap);
void srv_chat_free(srv_chat_t *c);
/* The families by name, for `serve --chat-template NAME` (as llama.cpp's
 * --chat-template chatml): a stand-in template that srv_chat_detect
 * recognises as that family (Llama 3.1 with its template's default date),
 * or NULL for another name.  SRV_CHAT_NAMES lists them for messages. */
#define SRV_CHAT_NAMES "llama3, llama3.1, llama2, mistral, chatml"
#define SRV_CHAT_NAMES_USAGE "llama3|llama3.1|llama2|mistral|chatml"
const char *srv_chat_builtin(const char *name);
/* The prompt text (malloc'd, special tokens written as text, BOS included
 * where the template puts it), and with plain non-NULL the byte ranges of
 * the messages' content in it (*n_plain pairs of begin and end, ascending;
 * malloc'd, NULL when none): to be tokenized without control tokens
 * (model_vocab_tokenize_plain), so that content cannot forge the template's
 * markers.  KVS_EINVAL with err naming the message at fault (unknown role,
 * system not first, broken alternation), KVS_ENOMEM. */
int srv_chat_render(const srv_chat_t *c, const srv_chat_msg_t *m, size_t n,
                    bool add_generation_prompt, char **out, size_t **plain, size_t *n_plain,
                    char *err, size_t cap);

#endif /* SRV_CHAT_H */
