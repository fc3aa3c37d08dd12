/*
 * serve/srv_bench_data.c — `kvserve bench --dataset FILE`: prompts of real
 * text instead of random token ids, called from srv_bench.c before the run.
 *
 * A file is JSON Lines (one object a line) or one JSON array of the same
 * objects.  An object is one of
 *   {"prompt": "text", "output_len": N}            vLLM's custom dataset
 *   {"messages": [{"role": .., "content": ..}, ..], "output_len": N}
 *                                                  rendered by the model's
 *                                                  chat template
 *   {"conversations": [{"from": "human", "value": ..},
 *                      {"from": "gpt", "value": ..}, ..]}   ShareGPT
 * output_len is optional; a ShareGPT entry's output length is its first
 * answer's token count.  --output-len, when given, overrides them all.
 *
 * The server tokenizes (Tokenize), so the bench needs no tokenizer of its
 * own and counts what the server will run.  As vLLM's benchmark does, the
 * entries are shuffled by --seed and taken in that order until there are
 * --num-requests that fit the server's max_model_len (prompt plus output),
 * so a large file costs only the calls the run needs; requests then go
 * round the ones taken.
 */
#include "srv_bench.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

typedef struct raw {
    json_t **v;   /* the entries, in file order (references held) */
    size_t *line; /* each entry's line (JSON Lines) or index + 1 (array) */
    size_t n, cap;
    bool array;
} raw_t;

static int
raw_push(raw_t *r, json_t *v, size_t line)
{
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 256;
        json_t **p = realloc(r->v, cap * sizeof *p);
        if (p == NULL)
            return KVS_ENOMEM;
        r->v = p;
        size_t *l = realloc(r->line, cap * sizeof *l);
        if (l == NULL)
            return KVS_ENOMEM;
        r->line = l;
        r->cap = cap;
    }
    r->v[r->n] = v;
    r->line[r->n++] = line;
    return 0;
}

static void
raw_free(raw_t *r)
{
    for (size_t i = 0; i < r->n; i++)
        json_decref(r->v[i]);
    free(r->v);
    free(r->line);
}

/* The file's entries: a JSON array's elements, or one object a non-blank
 * line.  0, or KVS_EINVAL / KVS_ENOMEM after saying why. */
static int
parse_file(const char *path, raw_t *r)
{
    size_t len;
    char *buf = srv_read_file(path, &len);
    if (buf == NULL) {
        fprintf(stderr, "kvserve bench: --dataset: cannot read '%s': %s\n", path, strerror(errno));
        return KVS_EINVAL;
    }
    const char *p = buf;
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
        p++;
    int rc = 0;
    json_error_t err;
    if (*p == '[') {
        r->array = true;
        json_t *a = json_loadb(buf, len, 0, &err);
        if (a == NULL) {
            fprintf(stderr, "kvserve bench: --dataset: %s: line %d: %s\n", path, err.line,
                    err.text);
            rc = KVS_EINVAL;
        }
        for (size_t i = 0; rc == 0 && i < json_array_size(a); i++)
            rc = raw_push(r, json_incref(json_array_get(a, i)), i + 1);
        json_decref(a);
    } else {
        size_t line = 0;
        for (char *s = buf; rc == 0 && s < buf + len;) {
            char *e = memchr(s, '\n', (size_t)(buf + len - s));
            size_t n = e ? (size_t)(e - s) : (size_t)(buf + len - s);
            line++;
            size_t i = 0;
            while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r'))
                i++;
            if (i < n) {
                json_t *v = json_loadb(s, n, 0, &err);
                if (v == NULL) {
                    fprintf(stderr, "kvserve bench: --dataset: %s: line %zu: %s\n", path, line,
                            err.text);
                    rc = KVS_EINVAL;
                } else if ((rc = raw_push(r, v, line)) != 0)
                    json_decref(v);
            }
            s += n + 1;
        }
    }
    free(buf);
    if (rc == 0 && r->n == 0) {
        fprintf(stderr, "kvserve bench: --dataset: %s has no entries\n", path);
        rc = KVS_EINVAL;
    }
    if (rc == KVS_ENOMEM)
        fprintf(stderr, "kvserve bench: --dataset: out of memory\n");
    return rc;
}

/* One entry made into a Tokenize request and (ShareGPT) the text whose
 * token count is its output length. */
typedef struct shaped {
    Kvserve__V1__TokenizeRequest req;
    Kvserve__V1__ChatMessages chat;
    Kvserve__V1__ChatMessage *msg_ptr[64];
    Kvserve__V1__ChatMessage msg[64];
    const char *answer; /* NULL: none */
    uint32_t out_len;   /* the entry's output_len; 0: none */
    bool skip;          /* a ShareGPT conversation without an answer */
} shaped_t;

/* A string member, or NULL (with a message naming it when it is there but
 * not a string). */
static int
get_str(const json_t *o, const char *key, const char **out, const char *where)
{
    json_t *v = json_object_get(o, key);
    *out = NULL;
    if (v == NULL)
        return 0;
    if (!json_is_string(v)) {
        fprintf(stderr, "kvserve bench: --dataset: %s: \"%s\" is not a string\n", where, key);
        return KVS_EINVAL;
    }
    *out = json_string_value(v);
    return 0;
}

/* Entry v into s; KVS_EINVAL after a message naming the field. */
static int
shape(const json_t *v, shaped_t *s, const char *where)
{
    memset(s, 0, sizeof *s);
    kvserve__v1__tokenize_request__init(&s->req);
    if (!json_is_object(v)) {
        fprintf(stderr, "kvserve bench: --dataset: %s: not a JSON object\n", where);
        return KVS_EINVAL;
    }
    json_t *ol = json_object_get(v, "output_len");
    if (ol != NULL) {
        json_int_t n = json_is_integer(ol) ? json_integer_value(ol) : 0;
        if (n < 1 || n > (1 << 24)) {
            fprintf(stderr,
                    "kvserve bench: --dataset: %s: \"output_len\" must be an integer in "
                    "1..16777216\n",
                    where);
            return KVS_EINVAL;
        }
        s->out_len = (uint32_t)n;
    }
    const char *prompt;
    if (get_str(v, "prompt", &prompt, where))
        return KVS_EINVAL;
    if (prompt) {
        s->req.text = (char *)prompt;
        return 0;
    }
    json_t *conv = json_object_get(v, "conversations");
    if (conv != NULL) {
        if (!json_is_array(conv)) {
            fprintf(stderr, "kvserve bench: --dataset: %s: \"conversations\" is not a list\n",
                    where);
            return KVS_EINVAL;
        }
        /* As vLLM takes ShareGPT: the first turn asks, the second answers. */
        const char *q = NULL, *a = NULL;
        if (json_array_size(conv) >= 1 && get_str(json_array_get(conv, 0), "value", &q, where))
            return KVS_EINVAL;
        if (json_array_size(conv) >= 2 && get_str(json_array_get(conv, 1), "value", &a, where))
            return KVS_EINVAL;
        s->skip = q == NULL || a == NULL;
        s->req.text = (char *)q;
        s->answer = a;
        return 0;
    }
    json_t *msgs = json_object_get(v, "messages");
    if (msgs == NULL) {
        fprintf(stderr,
                "kvserve bench: --dataset: %s: neither \"prompt\", \"messages\" nor "
                "\"conversations\"\n",
                where);
        return KVS_EINVAL;
    }
    size_t n = json_array_size(msgs);
    if (!json_is_array(msgs) || n == 0 || n > 64) {
        fprintf(stderr,
                "kvserve bench: --dataset: %s: \"messages\" must be a list of 1..64 messages\n",
                where);
        return KVS_EINVAL;
    }
    kvserve__v1__chat_messages__init(&s->chat);
    for (size_t i = 0; i < n; i++) {
        const json_t *m = json_array_get(msgs, i);
        Kvserve__V1__ChatMessage *cm = &s->msg[i];
        kvserve__v1__chat_message__init(cm);
        const char *role, *content;
        if (!json_is_object(m) || get_str(m, "role", &role, where) ||
            get_str(m, "content", &content, where) || role == NULL || content == NULL) {
            fprintf(stderr,
                    "kvserve bench: --dataset: %s: messages[%zu] needs string \"role\" and "
                    "\"content\"\n",
                    where, i);
            return KVS_EINVAL;
        }
        cm->role = (char *)role;
        cm->content = (char *)content;
        s->msg_ptr[i] = cm;
    }
    s->chat.messages = s->msg_ptr;
    s->chat.n_messages = n;
    s->req.chat = &s->chat;
    return 0;
}

/* The server's token ids of req: 0 and *ids (malloc'd; *n may be 0), or
 * KVS_EIO after srv_client_unary said why. */
static int
tokenize(bench_t *b, const Kvserve__V1__TokenizeRequest *req, uint32_t **ids, uint32_t *n)
{
    Kvserve__V1__TokenizeResponse *tr = (Kvserve__V1__TokenizeResponse *)bench_unary(
        b, SRV_M_TOKENIZE, &req->base, &kvserve__v1__tokenize_response__descriptor,
        "kvserve bench: --dataset: Tokenize");
    if (tr == NULL)
        return KVS_EIO;
    *n = (uint32_t)tr->n_ids;
    *ids = malloc((tr->n_ids ? tr->n_ids : 1) * sizeof **ids);
    if (*ids)
        memcpy(*ids, tr->ids, tr->n_ids * sizeof **ids);
    protobuf_c_message_free_unpacked(&tr->base, NULL);
    return *ids ? 0 : KVS_ENOMEM;
}

/* The server's max_model_len, or 0 after saying why not. */
static uint32_t
max_model_len(bench_t *b)
{
    Kvserve__V1__GetServerInfoRequest req = KVSERVE__V1__GET_SERVER_INFO_REQUEST__INIT;
    Kvserve__V1__ServerInfo *si = (Kvserve__V1__ServerInfo *)bench_unary(
        b, SRV_M_SERVER_INFO, &req.base, &kvserve__v1__server_info__descriptor,
        "kvserve bench: GetServerInfo");
    uint32_t n = si ? si->max_model_len : 0;
    if (si && n == 0)
        fprintf(stderr, "kvserve bench: GetServerInfo: no max_model_len in the answer\n");
    if (si)
        protobuf_c_message_free_unpacked(&si->base, NULL);
    return n;
}

int
bench_dataset(bench_t *b)
{
    const bench_opts_t *o = &b->o;
    raw_t raw = {0};
    int rc = parse_file(o->dataset, &raw);
    size_t *order = NULL;
    if (rc == 0 &&
        ((order = malloc(raw.n * sizeof *order)) == NULL ||
         (b->data = calloc(raw.n < o->n_req ? raw.n : o->n_req, sizeof *b->data)) == NULL)) {
        fprintf(stderr, "kvserve bench: --dataset: out of memory\n");
        rc = KVS_ENOMEM;
    }
    if (rc == 0) {
        /* Fisher-Yates from --seed: the same file and seed take the same
         * entries in the same order. */
        uint64_t s = o->seed ^ 0x64617461736574ull;
        for (size_t i = 0; i < raw.n; i++)
            order[i] = i;
        for (size_t i = raw.n; i > 1; i--) {
            size_t j = (size_t)(srv_rng_next(&s) % i), t = order[i - 1];
            order[i - 1] = order[j];
            order[j] = t;
        }
    }
    /* Every entry is checked, not only those this seed takes: a file is
     * refused or not whatever the seed. */
    for (size_t i = 0; rc == 0 && i < raw.n; i++) {
        char where[512];
        shaped_t sh;
        snprintf(where, sizeof where, raw.array ? "%.400s: entry %zu" : "%.400s: line %zu",
                 o->dataset, raw.line[i]);
        rc = shape(raw.v[i], &sh, where);
    }
    /* A file refused costs no call. */
    uint32_t max_len = rc == 0 ? max_model_len(b) : 0;
    if (rc == 0 && max_len == 0)
        rc = KVS_EIO;
    b->data_total = (uint32_t)(raw.n < UINT32_MAX ? raw.n : UINT32_MAX);
    for (size_t i = 0; rc == 0 && i < raw.n && b->n_data < o->n_req; i++) {
        char where[512];
        snprintf(where, sizeof where, raw.array ? "%.400s: entry %zu" : "%.400s: line %zu",
                 o->dataset, raw.line[order[i]]);
        shaped_t sh;
        if ((rc = shape(raw.v[order[i]], &sh, where)) != 0)
            break;
        b->data_examined++;
        if (sh.skip) {
            b->data_unanswered++;
            continue;
        }
        bench_entry_t *e = &b->data[b->n_data];
        if ((rc = tokenize(b, &sh.req, &e->ids, &e->n_ids)) != 0)
            break;
        uint32_t out = o->has_out_len ? o->out_len : sh.out_len;
        if (out == 0 && sh.answer) {
            Kvserve__V1__TokenizeRequest ar = KVSERVE__V1__TOKENIZE_REQUEST__INIT;
            uint32_t *ids;
            ar.text = (char *)sh.answer;
            ar.has_add_bos = true; /* an answer continues the prompt: no BOS of its own */
            ar.add_bos = false;
            if ((rc = tokenize(b, &ar, &ids, &out)) != 0) {
                free(e->ids);
                e->ids = NULL;
                break;
            }
            free(ids);
        }
        if (out == 0)
            out = o->out_len;
        /* An empty prompt, or one that leaves no room for its output. */
        if (e->n_ids == 0 || (uint64_t)e->n_ids + out > max_len) {
            free(e->ids);
            e->ids = NULL;
            b->data_too_long += e->n_ids != 0;
            b->data_empty += e->n_ids == 0;
            continue;
        }
        e->out_len = out;
        b->n_data++;
    }
    if (rc == 0 && b->n_data == 0) {
        fprintf(stderr,
                "kvserve bench: --dataset: no entry of %s fits (max_model_len %u: %u too long, "
                "%u empty, %u without an answer)\n",
                o->dataset, max_len, b->data_too_long, b->data_empty, b->data_unanswered);
        rc = KVS_EINVAL;
    }
    if (rc == 0 && o->progress)
        fprintf(stderr,
                "kvserve bench: --dataset %s: %u entries taken of %u looked at (of %u): %u too "
                "long for max_model_len %u, %u empty, %u without an answer\n",
                o->dataset, b->n_data, b->data_examined, b->data_total, b->data_too_long, max_len,
                b->data_empty, b->data_unanswered);
    free(order);
    raw_free(&raw);
    return rc;
}

void
bench_dataset_free(bench_t *b)
{
    for (uint32_t i = 0; b->data && i < b->n_data; i++)
        free(b->data[i].ids);
    free(b->data);
    b->data = NULL;
    b->n_data = 0;
}
