/*
 * serve/srv_schema.c — JSON schema -> regex for guided_json (see
 * srv_schema.h).  Called from serve/ per request; the regex goes to
 * model/guide.c, which builds a DFA from it.
 *
 * One recursive pass over the parsed schema appends regex text to a single
 * growing buffer.  A sub-pattern needed twice (the members of a list, the
 * properties of an object with optional keys) is generated once, taken out
 * of the buffer as a string and pasted where needed: a regex cannot name a
 * sub-pattern, so that text is duplicated anyway, but the schema is walked
 * (and $ref recursion counted) only once.
 *
 * A $ref that recurses deeper than SCH_REF_DEPTH returns SCH_CUT instead of
 * text; the nearest enclosing optional position (optional property, anyOf
 * branch, array items that may be absent) drops its alternative, and one
 * that reaches the top turns into KVS_EINVAL.
 */
#include "srv_schema.h"

#include "base/kvs.h"

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    SCH_MAX_NEST = 32,     /* schema levels, $ref expansions included */
    SCH_MAX_OUT = 1 << 20, /* bytes of regex */
    /* Containers nested in a `true` position: each level holds 4 copies of
       the one below (first and further members of arrays and objects), so
       the text grows 4x a level: 4.3 KB at 2, 17.8 KB at 3 (about 6,800 DFA
       states in model/guide.c), 72 KB at 4. */
    SCH_ANY_DEPTH = 3,
    SCH_REF_DEPTH = 3,   /* expansions of one $ref along a path */
    SCH_MAX_LEN = 1000,  /* minLength/maxLength and {n,m}: the dialect's cap */
    SCH_MAX_ITEMS = 100, /* minItems/maxItems: counted repetition multiplies DFA states */
    SCH_MAX_GROUPS = 32, /* group nesting inside one pattern */
    SCH_CUT = 1,         /* internal: a $ref recursed too deep (never returned) */
};

/* One JSON string character: anything but '"', '\' and controls, or an escape. */
#define STR_CHAR "(?:[^\"\\\\\\x00-\\x1F]|\\\\(?:[\"\\\\/bfnrt]|u[0-9a-fA-F]{4}))"
#define STR_ANY "\"" STR_CHAR "*\""
#define INT_RE "-?(?:0|[1-9][0-9]*)"
#define FRAC_EXP "(?:\\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
#define NUM_RE INT_RE FRAC_EXP
#define NUM_NONNEG "(?:0|[1-9][0-9]*)" FRAC_EXP
/* Positive: a non-zero integer part, or 0 with a non-zero digit after the point. */
#define NUM_POS "(?:[1-9][0-9]*(?:\\.[0-9]+)?|0\\.[0-9]*[1-9][0-9]*)(?:[eE][+-]?[0-9]+)?"

/* Months with their own day counts; February allows 29 (no leap-year test). */
#define FMT_DATE                                                                                  \
    "[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]" \
    "|30)|02-(?:0[1-9]|[12][0-9]))"
#define FMT_HMS "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?"
#define FMT_ZONE "(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"

static const struct {
    const char *name, *re;
} formats[] = {
    {"date", FMT_DATE},
    {"time", FMT_HMS FMT_ZONE}, /* RFC 3339 full-time: the offset is not optional */
    {"date-time", FMT_DATE "[Tt]" FMT_HMS FMT_ZONE},
    {"uuid", "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"},
};

/* Constraints we know and do not honour: refusing beats silently ignoring. */
static const char *const kw_unsupported[] = {"not",
                                             "if",
                                             "then",
                                             "else",
                                             "dependentRequired",
                                             "dependentSchemas",
                                             "dependencies",
                                             "patternProperties",
                                             "propertyNames",
                                             "unevaluatedProperties",
                                             "unevaluatedItems",
                                             "contains",
                                             "minContains",
                                             "maxContains",
                                             "minProperties",
                                             "maxProperties",
                                             "multipleOf",
                                             "$dynamicRef",
                                             "$recursiveRef",
                                             NULL};
static const char *const kw_comb[] = {"type",  "enum",  "const", "$ref",
                                      "allOf", "anyOf", "oneOf", NULL};
static const char *const kw_string[] = {"minLength", "maxLength", "pattern", "format", NULL};
static const char *const kw_number[] = {"minimum", "maximum", "exclusiveMinimum",
                                        "exclusiveMaximum", NULL};
static const char *const kw_array[] = {"items",    "prefixItems", "additionalItems",
                                       "minItems", "maxItems",    NULL};
static const char *const kw_object[] = {"properties", "required", "additionalProperties", NULL};

enum {
    T_OBJECT = 1,
    T_ARRAY = 2,
    T_STRING = 4,
    T_NUMBER = 8,
    T_INTEGER = 16,
    T_BOOLEAN = 32,
    T_NULL = 64,
    T_ALL = 127,
};
static const char *const type_names[] = {"object",  "array",   "string", "number",
                                         "integer", "boolean", "null"};

typedef struct sch {
    const json_t *root;
    const char *ws;
    char *out; /* the regex so far; NUL-terminated */
    size_t len, cap;
    int fail; /* sticky: KVS_ENOMEM, or KVS_EINVAL for the size limit */
    char *err;
    size_t err_len;
    char *ptr; /* JSON pointer of the schema being compiled, for messages */
    size_t plen, pcap;
    int depth;
    const json_t *refs[SCH_MAX_NEST + 1]; /* $ref targets being expanded */
    int nrefs;
    char cut_msg[400];
} sch_t;

#define TRY(x)          \
    do {                \
        int rc_ = (x);  \
        if (rc_ != 0)   \
            return rc_; \
    } while (0)

static int gen(sch_t *s, const json_t *node);

/* ------------------------------------------------------------------------ */
/* Messages and buffers                                                      */
/* ------------------------------------------------------------------------ */

static void
vmsg(const sch_t *s, char *dst, size_t dst_len, const char *fmt, va_list ap)
{
    if (dst == NULL || dst_len == 0)
        return;
    /* The root's pointer is "", which reads as nothing at all. */
    int n = snprintf(dst, dst_len, "%s: ", s->plen > 0 ? s->ptr : "/");
    if (n >= 0 && (size_t)n < dst_len)
        vsnprintf(dst + n, dst_len - (size_t)n, fmt, ap);
}

static int __attribute__((format(printf, 2, 3))) einval(sch_t *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmsg(s, s->err, s->err_len, fmt, ap);
    va_end(ap);
    return KVS_EINVAL;
}

static void
oom(sch_t *s)
{
    if (s->fail == 0) {
        s->fail = KVS_ENOMEM;
        if (s->err != NULL && s->err_len > 0)
            snprintf(s->err, s->err_len, "out of memory");
    }
}

/* Room for need bytes and a NUL in *buf (of *cap bytes, first size
 * `first`); false after oom. */
static bool
grow_chars(sch_t *s, char **buf, size_t *cap, size_t need, size_t first)
{
    if (need + 1 <= *cap)
        return true;
    size_t c = *cap > 0 ? *cap : first;
    while (c < need + 1)
        c *= 2;
    char *p = realloc(*buf, c);
    if (p == NULL) {
        oom(s);
        return false;
    }
    *buf = p;
    *cap = c;
    return true;
}

static bool
reserve(sch_t *s, size_t n)
{
    if (s->fail != 0)
        return false;
    if (s->len + n > SCH_MAX_OUT) {
        s->fail = einval(s, "the regex exceeds the limit of %d bytes", SCH_MAX_OUT);
        return false;
    }
    return grow_chars(s, &s->out, &s->cap, s->len + n, 1024);
}

static void
put_n(sch_t *s, const char *p, size_t n)
{
    if (!reserve(s, n))
        return;
    memcpy(s->out + s->len, p, n);
    s->len += n;
    s->out[s->len] = '\0';
}

static void
put(sch_t *s, const char *p)
{
    put_n(s, p, strlen(p));
}

static void __attribute__((format(printf, 2, 3))) putf(sch_t *s, const char *fmt, ...)
{
    char b[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    if (n > 0)
        put_n(s, b, (size_t)n < sizeof b ? (size_t)n : sizeof b - 1);
}

static void
trunc_to(sch_t *s, size_t mark)
{
    if (s->out != NULL && mark <= s->len) {
        s->len = mark;
        s->out[mark] = '\0';
    }
}

/* Removes the text written since mark and returns it as a string. */
static char *
take(sch_t *s, size_t mark)
{
    if (s->fail != 0)
        return NULL;
    char *p = strndup(s->out + mark, s->len - mark);
    if (p == NULL) {
        oom(s);
        return NULL;
    }
    trunc_to(s, mark);
    return p;
}

static void
put_ws(sch_t *s)
{
    put(s, s->ws);
}

static void
put_sep(sch_t *s)
{
    put_ws(s);
    put(s, ",");
    put_ws(s);
}

static void
put_colon(sch_t *s)
{
    put_ws(s);
    put(s, ":");
    put_ws(s);
}

/* The quantifier for lo..hi repeats (hi < 0: unbounded); nothing for {1}. */
static void
put_quant(sch_t *s, long long lo, long long hi)
{
    if (hi < 0) {
        if (lo == 0)
            put(s, "*");
        else if (lo == 1)
            put(s, "+");
        else
            putf(s, "{%lld,}", lo);
    } else if (lo == hi) {
        if (lo != 1)
            putf(s, "{%lld}", lo);
    } else if (lo == 0 && hi == 1) {
        put(s, "?");
    } else {
        putf(s, "{%lld,%lld}", lo, hi);
    }
}

/* ------------------------------------------------------------------------ */
/* JSON pointers                                                             */
/* ------------------------------------------------------------------------ */

static bool
ptr_grow(sch_t *s, size_t need)
{
    return grow_chars(s, &s->ptr, &s->pcap, need, 128);
}

/* Appends "/seg" (~ and / escaped); returns the length to pop back to. */
static size_t
ptr_push(sch_t *s, const char *seg)
{
    size_t old = s->plen;
    if (!ptr_grow(s, s->plen + 1 + 2 * strlen(seg)))
        return old;
    s->ptr[s->plen++] = '/';
    for (const char *c = seg; *c != '\0'; c++) {
        if (*c == '~' || *c == '/') {
            s->ptr[s->plen++] = '~';
            s->ptr[s->plen++] = *c == '~' ? '0' : '1';
        } else {
            s->ptr[s->plen++] = *c;
        }
    }
    s->ptr[s->plen] = '\0';
    return old;
}

static size_t
ptr_push_idx(sch_t *s, const char *kw, size_t i)
{
    char b[24];
    snprintf(b, sizeof b, "%zu", i);
    size_t old = ptr_push(s, kw);
    ptr_push(s, b);
    return old;
}

static void
ptr_pop(sch_t *s, size_t old)
{
    if (s->ptr != NULL && old <= s->plen) {
        s->plen = old;
        s->ptr[old] = '\0';
    }
}

static void
ptr_set(sch_t *s, const char *p)
{
    size_t n = strlen(p);
    if (!ptr_grow(s, n))
        return;
    memcpy(s->ptr, p, n + 1);
    s->plen = n;
}

/* ------------------------------------------------------------------------ */
/* Literals                                                                  */
/* ------------------------------------------------------------------------ */

static void
put_utf8(sch_t *s, uint32_t c)
{
    uint8_t b[4];
    put_n(s, (const char *)b, kvs_utf8_put(c, b));
}

/* One code point as a regex literal, inside a class or outside. */
static void
put_cp(sch_t *s, uint32_t c, bool in_class)
{
    if (c < 0x20 || c == 0x7F) {
        putf(s, "\\x%02X", (unsigned)c);
    } else if (c < 0x80) {
        if (strchr(in_class ? "\\]^-[" : "\\.*+?()[]{}|^$", (int)c) != NULL)
            put(s, "\\");
        char ch = (char)c;
        put_n(s, &ch, 1);
    } else {
        put_utf8(s, c);
    }
}

/* The regex for the text t, taken literally. */
static void
put_lit(sch_t *s, const char *t)
{
    for (; *t != '\0'; t++)
        put_cp(s, (unsigned char)*t, false);
}

/* The regex for the canonical JSON spelling of the string p[0..n). */
static void
put_json_str(sch_t *s, const char *p, size_t n)
{
    put(s, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        const char *e = NULL;
        switch (c) {
        case '"':
            e = "\\\\\"";
            break;
        case '\\':
            e = "\\\\\\\\";
            break;
        case '\b':
            e = "\\\\b";
            break;
        case '\f':
            e = "\\\\f";
            break;
        case '\n':
            e = "\\\\n";
            break;
        case '\r':
            e = "\\\\r";
            break;
        case '\t':
            e = "\\\\t";
            break;
        default:
            break;
        }
        if (e != NULL)
            put(s, e);
        else if (c < 0x20)
            putf(s, "\\\\u%04x", c);
        else if (c < 0x80)
            put_cp(s, c, false);
        else
            put_n(s, (const char *)&p[i], 1); /* UTF-8 bytes pass as they are */
    }
    put(s, "\"");
}

/* A JSON number's text: integers as they are, reals in the shortest form
   that reads back the same (jansson's own %.17g gives 0.10000000000000001). */
static void
num_text(const json_t *j, char *b, size_t n)
{
    if (json_is_integer(j)) {
        snprintf(b, n, "%" JSON_INTEGER_FORMAT, json_integer_value(j));
        return;
    }
    double v = json_real_value(j);
    for (int p = 1; p <= 17; p++) {
        snprintf(b, n, "%.*g", p, v);
        if (strtod(b, NULL) == v)
            break;
    }
    if (strpbrk(b, ".eEn") == NULL && strlen(b) + 3 <= n)
        strcat(b, ".0");
}

/* ------------------------------------------------------------------------ */
/* Any value                                                                 */
/* ------------------------------------------------------------------------ */

/* open ws (x (ws , ws x){min-1,max-1} ws)? close: a JSON array or object
   whose members all match x (max < 0: unbounded). */
static void
put_list(sch_t *s, const char *open, const char *close, const char *x, long long min, long long max)
{
    put(s, open);
    put_ws(s);
    if (max != 0) {
        if (min == 0)
            put(s, "(?:");
        put(s, x);
        long long lo = min > 0 ? min - 1 : 0, hi = max < 0 ? -1 : max - 1;
        if (hi != 0) {
            put(s, "(?:");
            put_sep(s);
            put(s, x);
            put(s, ")");
            put_quant(s, lo, hi);
        }
        put_ws(s);
        if (min == 0)
            put(s, ")?");
    }
    put(s, close);
}

/* An object with any keys, each value matching v. */
static void
put_map(sch_t *s, const char *v)
{
    size_t mark = s->len;
    put(s, STR_ANY);
    put_colon(s);
    put(s, v);
    char *m = take(s, mark);
    if (m == NULL)
        return;
    put_list(s, "\\{", "\\}", m, 0, -1);
    free(m);
}

/* Any JSON value whose arrays and objects nest at most d deep. */
static void
put_any(sch_t *s, int d)
{
    put(s, "(?:" STR_ANY "|" NUM_RE "|true|false|null");
    if (d > 0) {
        size_t mark = s->len;
        put_any(s, d - 1);
        char *x = take(s, mark);
        if (x == NULL)
            return;
        put(s, "|");
        put_list(s, "\\[", "\\]", x, 0, -1);
        put(s, "|");
        put_map(s, x);
        free(x);
    }
    put(s, ")");
}

/* ------------------------------------------------------------------------ */
/* Keywords                                                                  */
/* ------------------------------------------------------------------------ */

static bool
in_list(const char *const *list, const char *kw)
{
    for (; *list != NULL; list++)
        if (strcmp(*list, kw) == 0)
            return true;
    return false;
}

static bool
has_any(const json_t *node, const char *const *list)
{
    for (; *list != NULL; list++)
        if (json_object_get(node, *list) != NULL)
            return true;
    return false;
}

/* The first constraining keyword of node that is not in allowed. */
static const char *
other_kw(const json_t *node, const char *const *allowed)
{
    static const char *const *const families[] = {kw_comb, kw_string, kw_number, kw_array,
                                                  kw_object};
    for (size_t f = 0; f < sizeof families / sizeof families[0]; f++)
        for (const char *const *k = families[f]; *k != NULL; k++)
            if (json_object_get(node, *k) != NULL && !in_list(allowed, *k))
                return *k;
    return NULL;
}

/* A count keyword (minLength, maxItems, ...): a non-negative integer <= cap. */
static int
get_count(sch_t *s, const json_t *node, const char *kw, long long cap, long long *v, bool *has)
{
    const json_t *j = json_object_get(node, kw);
    *has = j != NULL;
    if (j == NULL)
        return 0;
    double d = json_is_integer(j) ? (double)json_integer_value(j)
               : json_is_real(j)  ? json_real_value(j)
                                  : -1;
    if (d < 0 || d != floor(d))
        return einval(s, "%s must be a non-negative integer", kw);
    if (d > (double)cap)
        return einval(s, "%s %.0f exceeds the limit of %lld", kw, d, cap);
    *v = (long long)d;
    return 0;
}

static unsigned
value_types(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return T_OBJECT;
    case JSON_ARRAY:
        return T_ARRAY;
    case JSON_STRING:
        return T_STRING;
    case JSON_INTEGER:
        return T_INTEGER | T_NUMBER;
    case JSON_REAL: {
        double d = json_real_value(v);
        return d == floor(d) ? T_INTEGER | T_NUMBER : T_NUMBER;
    }
    case JSON_TRUE:
    case JSON_FALSE:
        return T_BOOLEAN;
    case JSON_NULL:
        return T_NULL;
    }
    return 0;
}

static int
add_type(sch_t *s, const json_t *t, unsigned *mask)
{
    const char *name = json_string_value(t);
    if (name == NULL)
        return einval(s, "type must be a string or a non-empty array of strings");
    for (size_t i = 0; i < sizeof type_names / sizeof type_names[0]; i++) {
        if (strcmp(name, type_names[i]) == 0) {
            *mask |= 1u << i;
            return 0;
        }
    }
    return einval(s, "type \"%s\" is unknown", name);
}

static int
parse_type(sch_t *s, const json_t *node, unsigned *mask)
{
    const json_t *t = json_object_get(node, "type");
    *mask = 0;
    if (json_is_array(t)) {
        if (json_array_size(t) == 0)
            return einval(s, "type must be a string or a non-empty array of strings");
        size_t i;
        const json_t *e;
        json_array_foreach(t, i, e) TRY(add_type(s, e, mask));
        return 0;
    }
    return add_type(s, t, mask);
}

/* ------------------------------------------------------------------------ */
/* enum / const                                                              */
/* ------------------------------------------------------------------------ */

/* The regex for one JSON value, with ws between its tokens. */
static void
put_value(sch_t *s, const json_t *v)
{
    char b[64];
    const char *key;
    const json_t *e;
    size_t i;
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        put(s, "\\{");
        put_ws(s);
        i = 0;
        json_object_foreach((json_t *)v, key, e)
        {
            if (i++ > 0)
                put_sep(s);
            put_json_str(s, key, strlen(key));
            put_colon(s);
            put_value(s, e);
        }
        if (i > 0)
            put_ws(s);
        put(s, "\\}");
        break;
    case JSON_ARRAY:
        put(s, "\\[");
        put_ws(s);
        json_array_foreach(v, i, e)
        {
            if (i > 0)
                put_sep(s);
            put_value(s, e);
        }
        if (json_array_size(v) > 0)
            put_ws(s);
        put(s, "\\]");
        break;
    case JSON_STRING:
        put_json_str(s, json_string_value(v), json_string_length(v));
        break;
    case JSON_INTEGER:
    case JSON_REAL:
        num_text(v, b, sizeof b);
        put_lit(s, b);
        break;
    case JSON_TRUE:
        put(s, "true");
        break;
    case JSON_FALSE:
        put(s, "false");
        break;
    case JSON_NULL:
        put(s, "null");
        break;
    }
}

static int
gen_enum(sch_t *s, const json_t *node)
{
    const char *kw = other_kw(node, (const char *const[]){"enum", "const", "type", NULL});
    if (kw != NULL)
        return einval(s, "%s alongside enum/const is not supported", kw);
    unsigned mask = T_ALL;
    if (json_object_get(node, "type") != NULL)
        TRY(parse_type(s, node, &mask));
    const json_t *en = json_object_get(node, "enum"), *cn = json_object_get(node, "const");
    if (en != NULL && (!json_is_array(en) || json_array_size(en) == 0))
        return einval(s, "enum must be a non-empty array");
    size_t n = 0;
    put(s, "(?:");
    if (en != NULL) {
        size_t i;
        const json_t *v;
        json_array_foreach(en, i, v)
        {
            if ((cn != NULL && !json_equal(v, cn)) || (value_types(v) & mask) == 0)
                continue;
            if (n++ > 0)
                put(s, "|");
            put_value(s, v);
        }
    } else if ((value_types(cn) & mask) != 0) {
        put_value(s, cn);
        n++;
    }
    put(s, ")");
    if (n == 0)
        return einval(s, "%s: no value satisfies the schema", en != NULL ? "enum" : "const");
    return 0;
}

/* ------------------------------------------------------------------------ */
/* pattern: our dialect, re-spelled for JSON string content                 */
/* ------------------------------------------------------------------------ */

/* A pattern's class lists at most CSET_MAX ranges.  Its complement has
 * one more, put_set takes four ranges out (each splits at most one, one
 * more each), and an operation holds two more than its result on the way:
 * CSET_CAP bounds them all. */
enum { CSET_MAX = 64, CSET_CAP = CSET_MAX + 8 };

/* A set of code points as sorted, disjoint ranges once normalised. */
typedef struct cset {
    int n;
    uint32_t lo[CSET_CAP], hi[CSET_CAP];
} cset_t;

/* Appends a range past any check of CSET_MAX (the operations below). */
static void
cset_push(cset_t *c, uint32_t lo, uint32_t hi)
{
    KVS_ASSERT(c->n < CSET_CAP);
    c->lo[c->n] = lo;
    c->hi[c->n++] = hi;
}

static bool
cset_add(cset_t *c, uint32_t lo, uint32_t hi)
{
    if (c->n >= CSET_MAX)
        return false;
    c->lo[c->n] = lo;
    c->hi[c->n] = hi;
    c->n++;
    return true;
}

static void
cset_norm(cset_t *c)
{
    for (int i = 1; i < c->n; i++) {
        uint32_t lo = c->lo[i], hi = c->hi[i];
        int j = i;
        for (; j > 0 && c->lo[j - 1] > lo; j--) {
            c->lo[j] = c->lo[j - 1];
            c->hi[j] = c->hi[j - 1];
        }
        c->lo[j] = lo;
        c->hi[j] = hi;
    }
    int m = 0;
    for (int i = 0; i < c->n; i++) {
        if (m > 0 && c->lo[i] <= c->hi[m - 1] + 1) {
            if (c->hi[i] > c->hi[m - 1])
                c->hi[m - 1] = c->hi[i];
        } else {
            c->lo[m] = c->lo[i];
            c->hi[m] = c->hi[i];
            m++;
        }
    }
    c->n = m;
}

/* Complement over [0, 0x10FFFF] of a normalised set (at most n + 1 ranges). */
static void
cset_invert(cset_t *c)
{
    cset_t r = {0};
    uint32_t next = 0;
    for (int i = 0; i < c->n; i++) {
        if (c->lo[i] > next)
            cset_push(&r, next, c->lo[i] - 1);
        next = c->hi[i] + 1;
    }
    if (next <= 0x10FFFF)
        cset_push(&r, next, 0x10FFFF);
    *c = r;
}

static bool
cset_has(const cset_t *c, uint32_t cp)
{
    for (int i = 0; i < c->n; i++)
        if (cp >= c->lo[i] && cp <= c->hi[i])
            return true;
    return false;
}

/* c \ [lo, hi] = not(not c | [lo, hi]). */
static void
cset_minus(cset_t *c, uint32_t lo, uint32_t hi)
{
    cset_invert(c);
    cset_push(c, lo, hi);
    cset_norm(c);
    cset_invert(c);
}

/* \d \w \s (ASCII, as the dialect defines them) and their negations. */
static bool
cset_add_escape(cset_t *c, uint32_t e)
{
    cset_t t = {0};
    switch (e | 0x20) {
    case 'd':
        cset_add(&t, '0', '9');
        break;
    case 'w':
        cset_add(&t, '0', '9');
        cset_add(&t, 'A', 'Z');
        cset_add(&t, '_', '_');
        cset_add(&t, 'a', 'z');
        break;
    default:
        cset_add(&t, '\t', '\r');
        cset_add(&t, ' ', ' ');
        break;
    }
    cset_norm(&t);
    if (e < 'a')
        cset_invert(&t);
    for (int i = 0; i < t.n; i++)
        if (!cset_add(c, t.lo[i], t.hi[i]))
            return false;
    return true;
}

/* A class of code points that need no escaping in a JSON string. */
static void
put_class(sch_t *s, const cset_t *safe)
{
    if (safe->n == 1 && safe->lo[0] == safe->hi[0]) {
        put_cp(s, safe->lo[0], false);
        return;
    }
    /* The negated form may list surrogates as matched: they never occur in
       UTF-8 input, and leaving them out of the complement keeps it short. */
    cset_t neg = *safe;
    cset_push(&neg, 0xD800, 0xDFFF);
    cset_norm(&neg);
    cset_invert(&neg);
    const cset_t *c = neg.n < safe->n ? &neg : safe;
    put(s, c == &neg ? "[^" : "[");
    for (int i = 0; i < c->n; i++) {
        put_cp(s, c->lo[i], true);
        if (c->hi[i] > c->lo[i] + 1)
            put(s, "-");
        if (c->hi[i] > c->lo[i])
            put_cp(s, c->hi[i], true);
    }
    put(s, "]");
}

static void
put_hex_class(sch_t *s, unsigned mask)
{
    static const char hex[] = "0123456789abcdef";
    if (__builtin_popcount(mask) == 1) {
        put_n(s, &hex[__builtin_ctz(mask)], 1);
        return;
    }
    put(s, "[");
    for (int i = 0; i < 16; i++) {
        if ((mask & 1u << i) == 0)
            continue;
        int j = i;
        while (j + 1 < 16 && j + 1 != 10 && (mask & 1u << (j + 1))) /* 9 and a are not adjacent */
            j++;
        put_n(s, &hex[i], 1);
        if (j > i + 1)
            put(s, "-");
        if (j > i)
            put_n(s, &hex[j], 1);
        i = j;
    }
    put(s, "]");
}

/* A set of decoded characters as the JSON text that spells them: plain
   characters as they are, '"' and '\' escaped, controls as \n or \u00XX.
   Returns false if the set is empty. */
static bool
put_set(sch_t *s, const cset_t *in)
{
    cset_t safe = *in;
    cset_minus(&safe, 0, 0x1F);
    cset_minus(&safe, '"', '"');
    cset_minus(&safe, '\\', '\\');
    cset_minus(&safe, 0xD800, 0xDFFF);
    static const char named[32] = {
        ['\b'] = 'b', ['\t'] = 't', ['\n'] = 'n', ['\f'] = 'f', ['\r'] = 'r'};
    char letters[8];
    int nl = 0;
    unsigned lo16 = 0, hi16 = 0;
    for (uint32_t c = 0; c < 0x20; c++) {
        if (!cset_has(in, c))
            continue;
        if (named[c] != 0)
            letters[nl++] = named[c];
        else if (c < 0x10)
            lo16 |= 1u << c;
        else
            hi16 |= 1u << (c - 0x10);
    }
    bool q = cset_has(in, '"'), b = cset_has(in, '\\');
    int pieces = (safe.n > 0) + q + b + (nl > 0) + (lo16 != 0) + (hi16 != 0);
    if (pieces == 0)
        return false;
    bool group = !(pieces == 1 && safe.n > 0);
    int k = 0;
    if (group)
        put(s, "(?:");
    if (safe.n > 0) {
        put_class(s, &safe);
        k++;
    }
    if (q)
        put(s, k++ > 0 ? "|\\\\\"" : "\\\\\"");
    if (b)
        put(s, k++ > 0 ? "|\\\\\\\\" : "\\\\\\\\");
    if (nl > 0) {
        put(s, k++ > 0 ? "|\\\\" : "\\\\");
        if (nl > 1)
            put(s, "[");
        put_n(s, letters, (size_t)nl);
        if (nl > 1)
            put(s, "]");
    }
    if (lo16 != 0) {
        put(s, k++ > 0 ? "|\\\\u000" : "\\\\u000");
        put_hex_class(s, lo16);
    }
    if (hi16 != 0) {
        put(s, k++ > 0 ? "|\\\\u001" : "\\\\u001");
        put_hex_class(s, hi16);
    }
    if (group)
        put(s, ")");
    return true;
}

typedef struct pat {
    sch_t *s;
    const unsigned char *start, *p, *end;
    int groups;
} pat_t;

static int
pat_err(pat_t *t, const char *what)
{
    return einval(t->s, "pattern: %s at offset %zu", what, (size_t)(t->p - t->start));
}

/* jansson has already checked the UTF-8. */
static uint32_t
pat_next(pat_t *t)
{
    uint32_t c = *t->p++;
    int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : 0;
    if (extra > 0)
        c &= 0x3Fu >> extra;
    for (; extra > 0 && t->p < t->end; extra--)
        c = c << 6 | (*t->p++ & 0x3F);
    return c;
}

static bool
pat_at(const pat_t *t, char c)
{
    return t->p < t->end && *t->p == (unsigned char)c;
}

static int
pat_hex(pat_t *t, int n, uint32_t *v)
{
    *v = 0;
    for (int i = 0; i < n; i++) {
        if (t->p >= t->end)
            return pat_err(t, "truncated hex escape");
        unsigned char c = *t->p;
        uint32_t d = c >= '0' && c <= '9'   ? (uint32_t)(c - '0')
                     : c >= 'a' && c <= 'f' ? (uint32_t)(c - 'a' + 10)
                     : c >= 'A' && c <= 'F' ? (uint32_t)(c - 'A' + 10)
                                            : 99;
        if (d == 99)
            return pat_err(t, "bad hex escape");
        *v = *v << 4 | d;
        t->p++;
    }
    return 0;
}

/* The escape after a backslash: a character in *cp, or (\d \w \s and
   negations) a set added to set with *is_set. */
static int
pat_escape(pat_t *t, bool in_class, uint32_t *cp, cset_t *set, bool *is_set)
{
    *is_set = false;
    if (t->p >= t->end)
        return pat_err(t, "trailing backslash");
    uint32_t c = pat_next(t);
    switch (c) {
    case 'd':
    case 'D':
    case 'w':
    case 'W':
    case 's':
    case 'S':
        *is_set = true;
        return cset_add_escape(set, c) ? 0 : pat_err(t, "character class too complex");
    case 'n':
        *cp = '\n';
        return 0;
    case 't':
        *cp = '\t';
        return 0;
    case 'r':
        *cp = '\r';
        return 0;
    case 'f':
        *cp = '\f';
        return 0;
    case 'v':
        *cp = '\v';
        return 0;
    case 'b':
        if (!in_class)
            return pat_err(t, "word boundary \\b is not supported");
        *cp = '\b';
        return 0;
    case 'x':
        return pat_hex(t, 2, cp);
    case 'u':
        TRY(pat_hex(t, 4, cp));
        if (*cp >= 0xD800 && *cp < 0xDC00 && t->end - t->p >= 6 && t->p[0] == '\\' &&
            t->p[1] == 'u') {
            uint32_t lo;
            t->p += 2;
            TRY(pat_hex(t, 4, &lo));
            if (lo < 0xDC00 || lo > 0xDFFF)
                return pat_err(t, "bad surrogate pair");
            *cp = 0x10000 + ((*cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (*cp >= 0xD800 && *cp <= 0xDFFF)
            return pat_err(t, "lone surrogate");
        return 0;
    case '0':
        if (t->p < t->end && *t->p >= '0' && *t->p <= '9')
            return pat_err(t, "octal escapes are not supported");
        *cp = 0;
        return 0;
    default:
        if (c >= '1' && c <= '9')
            return pat_err(t, "backreferences are not supported");
        if (c < 0x80 && ((c | 0x20) >= 'a' && (c | 0x20) <= 'z'))
            return pat_err(t, "this escape is not supported");
        *cp = c; /* escaped punctuation, or any non-ASCII character */
        return 0;
    }
}

/* [...] after the '['. */
static int
pat_class(pat_t *t, cset_t *set)
{
    bool neg = pat_at(t, '^');
    if (neg)
        t->p++;
    for (bool first = true;; first = false) {
        if (t->p >= t->end)
            return pat_err(t, "unterminated character class");
        if (pat_at(t, ']') && !first) {
            t->p++;
            break;
        }
        if (pat_at(t, '[') && t->end - t->p > 1 &&
            (t->p[1] == ':' || t->p[1] == '.' || t->p[1] == '='))
            return pat_err(t, "POSIX classes are not supported");
        uint32_t lo, hi;
        bool is_set = false;
        if (pat_at(t, '\\')) {
            t->p++;
            TRY(pat_escape(t, true, &lo, set, &is_set));
        } else {
            lo = pat_next(t);
        }
        bool range = t->end - t->p > 1 && t->p[0] == '-' && t->p[1] != ']';
        if (is_set) {
            if (range)
                return pat_err(t, "a range cannot start at a class escape");
            continue;
        }
        hi = lo;
        if (range) {
            t->p++;
            if (pat_at(t, '\\')) {
                cset_t dummy = {0};
                t->p++;
                TRY(pat_escape(t, true, &hi, &dummy, &is_set));
                if (is_set)
                    return pat_err(t, "a range cannot end at a class escape");
            } else {
                hi = pat_next(t);
            }
            if (hi < lo)
                return pat_err(t, "range out of order");
        }
        if (!cset_add(set, lo, hi))
            return pat_err(t, "character class too complex");
    }
    cset_norm(set);
    if (neg)
        cset_invert(set);
    return 0;
}

static int
pat_num(pat_t *t, long long *v)
{
    if (t->p >= t->end || *t->p < '0' || *t->p > '9')
        return -1;
    *v = 0;
    while (t->p < t->end && *t->p >= '0' && *t->p <= '9') {
        if (*v <= SCH_MAX_LEN)
            *v = *v * 10 + (*t->p - '0');
        t->p++;
    }
    return 0;
}

static int
pat_quant(pat_t *t)
{
    if (t->p >= t->end)
        return 0;
    unsigned char c = *t->p;
    if (c == '*' || c == '+' || c == '?') {
        t->p++;
        put_n(t->s, (const char *)&c, 1);
    } else if (c == '{') {
        long long n, m = -2;
        t->p++;
        if (pat_num(t, &n) != 0)
            return pat_err(t, "'{' is not a quantifier (write \\{)");
        if (pat_at(t, ',')) {
            t->p++;
            m = -1;
            if (!pat_at(t, '}') && pat_num(t, &m) != 0)
                return pat_err(t, "bad {n,m} quantifier");
        }
        if (!pat_at(t, '}'))
            return pat_err(t, "bad {n,m} quantifier");
        t->p++;
        if (n > SCH_MAX_LEN || m > SCH_MAX_LEN)
            return pat_err(t, "repeat count above 1000");
        if (m >= 0 && m < n)
            return pat_err(t, "quantifier {n,m} with m < n");
        if (m == -2)
            putf(t->s, "{%lld}", n);
        else if (m == -1)
            putf(t->s, "{%lld,}", n);
        else
            putf(t->s, "{%lld,%lld}", n, m);
    } else {
        return 0;
    }
    if (t->p < t->end && strchr("*+?{", *t->p) != NULL)
        return pat_err(t, "lazy, possessive or stacked quantifiers are not supported");
    return 0;
}

static int pat_alt(pat_t *t);

static int
pat_seq(pat_t *t)
{
    while (t->p < t->end && *t->p != '|' && *t->p != ')') {
        cset_t set = {0};
        bool is_set = false;
        uint32_t cp = 0;
        switch (*t->p) {
        case '(':
            t->p++;
            if (pat_at(t, '?')) {
                if (t->end - t->p < 2 || t->p[1] != ':')
                    return pat_err(t, "only (...) and (?:...) groups are supported");
                t->p += 2;
            }
            if (++t->groups > SCH_MAX_GROUPS)
                return pat_err(t, "groups nested too deep");
            put(t->s, "(?:");
            TRY(pat_alt(t));
            if (!pat_at(t, ')'))
                return pat_err(t, "missing )");
            t->p++;
            t->groups--;
            put(t->s, ")");
            TRY(pat_quant(t));
            continue;
        case '[':
            t->p++;
            TRY(pat_class(t, &set));
            is_set = true;
            break;
        case '.': /* as in PCRE2 and ECMA-262: anything but a newline */
            t->p++;
            cset_add(&set, 0, '\n' - 1);
            cset_add(&set, '\n' + 1, 0x10FFFF);
            is_set = true;
            break;
        case '\\':
            t->p++;
            TRY(pat_escape(t, false, &cp, &set, &is_set));
            break;
        case '^':
            return pat_err(t, "anchor ^ inside the pattern is not supported");
        case '$':
            /* A trailing $ is implied by the full match; anywhere else it is not. */
            if (t->end - t->p == 1 && t->groups == 0) {
                t->p++;
                return 0;
            }
            return pat_err(t, "anchor $ inside the pattern is not supported");
        case '*':
        case '+':
        case '?':
        case '{':
            return pat_err(t, "quantifier without a target");
        default:
            cp = pat_next(t);
            break;
        }
        if (!is_set)
            cset_add(&set, cp, cp);
        if (!put_set(t->s, &set))
            return pat_err(t, "class matches nothing");
        TRY(pat_quant(t));
    }
    return 0;
}

static int
pat_alt(pat_t *t)
{
    for (;;) {
        TRY(pat_seq(t));
        if (!pat_at(t, '|'))
            return 0;
        t->p++;
        put(t->s, "|");
    }
}

static int
put_pattern(sch_t *s, const char *p, size_t n)
{
    pat_t t = {.s = s,
               .start = (const unsigned char *)p,
               .p = (const unsigned char *)p,
               .end = (const unsigned char *)p + n};
    if (pat_at(&t, '^'))
        t.p++;
    put(s, "(?:");
    TRY(pat_alt(&t));
    if (t.p < t.end)
        return pat_err(&t, "unmatched )");
    put(s, ")");
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Scalars                                                                   */
/* ------------------------------------------------------------------------ */

static int
gen_string(sch_t *s, const json_t *node)
{
    long long mn = 0, mx = -1, v;
    bool hmn, hmx;
    TRY(get_count(s, node, "minLength", SCH_MAX_LEN, &mn, &hmn));
    TRY(get_count(s, node, "maxLength", SCH_MAX_LEN, &v, &hmx));
    if (hmx)
        mx = v;
    if (hmx && mn > mx)
        return einval(s, "minLength %lld exceeds maxLength %lld", mn, mx);
    const json_t *pat = json_object_get(node, "pattern"), *fmt = json_object_get(node, "format");
    if (pat != NULL) {
        if (!json_is_string(pat))
            return einval(s, "pattern must be a string");
        if (fmt != NULL)
            return einval(s, "pattern alongside format is not supported");
        if (hmn || hmx)
            return einval(s, "pattern alongside %s is not supported",
                          hmn ? "minLength" : "maxLength");
        put(s, "\"");
        TRY(put_pattern(s, json_string_value(pat), json_string_length(pat)));
        put(s, "\"");
        return 0;
    }
    if (fmt != NULL) {
        if (!json_is_string(fmt))
            return einval(s, "format must be a string");
        for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++) {
            if (strcmp(json_string_value(fmt), formats[i].name) != 0)
                continue;
            if (hmn || hmx)
                return einval(s, "format alongside %s is not supported",
                              hmn ? "minLength" : "maxLength");
            put(s, "\"");
            put(s, formats[i].re);
            put(s, "\"");
            return 0;
        }
        return einval(s, "format \"%s\" is not supported", json_string_value(fmt));
    }
    if (mx == 0) {
        put(s, "\"\"");
        return 0;
    }
    put(s, "\"" STR_CHAR);
    put_quant(s, mn, mx);
    put(s, "\"");
    return 0;
}

/* An integral bound; reals count when integral (JSON Schema: 1.0 is 1). */
static int
int_bound(sch_t *s, const json_t *node, const char *kw, bool *has, long long *v)
{
    const json_t *j = json_object_get(node, kw);
    *has = j != NULL;
    if (j == NULL)
        return 0;
    if (json_is_integer(j)) {
        *v = json_integer_value(j);
        return 0;
    }
    if (!json_is_real(j))
        return einval(s, "%s must be a number", kw);
    char b[64];
    num_text(j, b, sizeof b);
    double d = json_real_value(j);
    if (d != floor(d))
        return einval(s, "%s %s is not an integer", kw, b);
    if (d < -9.2e18 || d > 9.2e18)
        return einval(s, "%s %s is out of range", kw, b);
    *v = (long long)d;
    return 0;
}

static unsigned long long
pow10u(int n)
{
    unsigned long long p = 1;
    while (n-- > 0)
        p *= 10;
    return p;
}

static const char nines[] = "99999999999999999999", zeros[] = "00000000000000000000";

static int
ndigits(unsigned long long v)
{
    int n = 1;
    for (; v >= 10; v /= 10)
        n++;
    return n;
}

static void
put_digits(sch_t *s, char a, char b)
{
    if (a == b)
        put_n(s, &a, 1);
    else if (b == a + 1)
        putf(s, "[%c%c]", a, b);
    else
        putf(s, "[%c-%c]", a, b);
}

static bool
all_are(const char *p, int n, char c)
{
    for (int i = 0; i < n; i++)
        if (p[i] != c)
            return false;
    return true;
}

/* Digit strings of n digits from x to y (x <= y, both n long): a shared
   prefix, then x's first digit with the rest of x..99, the digits strictly
   between with anything after, and y's first digit with 00..the rest of y. */
static void
put_same_len(sch_t *s, const char *x, const char *y, int n)
{
    int i = 0;
    while (i < n && x[i] == y[i])
        i++;
    put_n(s, x, (size_t)i);
    if (i == n)
        return;
    x += i;
    y += i;
    n -= i;
    if (n == 1) {
        put_digits(s, x[0], y[0]);
        return;
    }
    bool xlow = all_are(x + 1, n - 1, '0'), yhigh = all_are(y + 1, n - 1, '9');
    char a = xlow ? x[0] : (char)(x[0] + 1), b = yhigh ? y[0] : (char)(y[0] - 1);
    int alts = !xlow + (a <= b) + !yhigh;
    if (alts > 1)
        put(s, "(?:");
    if (!xlow) {
        put_n(s, x, 1);
        put_same_len(s, x + 1, nines, n - 1);
    }
    if (a <= b) {
        if (!xlow)
            put(s, "|");
        put_digits(s, a, b);
        put(s, "[0-9]");
        if (n - 1 > 1)
            putf(s, "{%d}", n - 1);
    }
    if (!yhigh) {
        if (alts > 1)
            put(s, "|");
        put_n(s, y, 1);
        put_same_len(s, zeros, y + 1, n - 1);
    }
    if (alts > 1)
        put(s, ")");
}

/* Canonical decimals of a..b (inf: a..infinity), a >= 0. */
static void
put_range(sch_t *s, unsigned long long a, unsigned long long b, bool inf)
{
    int la = ndigits(a), lb = inf ? la : ndigits(b);
    bool first = true;
    put(s, "(?:");
    for (int l = la; l <= lb; l++) {
        unsigned long long low = l == 1 ? 0 : pow10u(l - 1);
        unsigned long long high = l == 20 ? ULLONG_MAX : pow10u(l) - 1;
        unsigned long long x = a > low ? a : low, y = inf || b > high ? high : b;
        if (x > y)
            continue;
        char xs[24], ys[24];
        snprintf(xs, sizeof xs, "%0*llu", l, x);
        snprintf(ys, sizeof ys, "%0*llu", l, y);
        if (!first)
            put(s, "|");
        first = false;
        put_same_len(s, xs, ys, l);
    }
    if (inf) {
        /* Every number with more digits than a. */
        put(s, first ? "[1-9][0-9]" : "|[1-9][0-9]");
        put_quant(s, la, -1);
    }
    put(s, ")");
}

static unsigned long long
magnitude(long long v)
{
    return v < 0 ? (unsigned long long)(-(v + 1)) + 1 : (unsigned long long)v;
}

static int
gen_integer(sch_t *s, const json_t *node)
{
    bool hlo = false, hhi = false, h;
    long long lo = 0, hi = 0, v;
    TRY(int_bound(s, node, "minimum", &h, &v));
    if (h) {
        hlo = true;
        lo = v;
    }
    TRY(int_bound(s, node, "exclusiveMinimum", &h, &v));
    if (h) {
        if (v == LLONG_MAX)
            return einval(s, "exclusiveMinimum %lld leaves no integer", v);
        if (!hlo || v + 1 > lo)
            lo = v + 1;
        hlo = true;
    }
    TRY(int_bound(s, node, "maximum", &h, &v));
    if (h) {
        hhi = true;
        hi = v;
    }
    TRY(int_bound(s, node, "exclusiveMaximum", &h, &v));
    if (h) {
        if (v == LLONG_MIN)
            return einval(s, "exclusiveMaximum %lld leaves no integer", v);
        if (!hhi || v - 1 < hi)
            hi = v - 1;
        hhi = true;
    }
    if (!hlo && !hhi) {
        put(s, INT_RE);
        return 0;
    }
    if (hlo && hhi && lo > hi)
        return einval(s, "minimum/maximum leave no integer (%lld > %lld)", lo, hi);
    put(s, "(?:");
    bool neg = !hlo || lo < 0;
    if (neg) {
        /* -n for n in [max(1, -hi), -lo]: never "-0". */
        put(s, "-");
        put_range(s, hhi && hi < 0 ? magnitude(hi) : 1, hlo ? magnitude(lo) : 0, !hlo);
    }
    if (!hhi || hi >= 0) {
        if (neg)
            put(s, "|");
        put_range(s, hlo && lo > 0 ? (unsigned long long)lo : 0, hhi ? (unsigned long long)hi : 0,
                  !hhi);
    }
    put(s, ")");
    return 0;
}

/* Real bounds cannot be expressed exactly in general; 0 as a lower bound can. */
static int
gen_number(sch_t *s, const json_t *node)
{
    bool nonneg = false, pos = false;
    for (int i = 0; kw_number[i] != NULL; i++) {
        const json_t *j = json_object_get(node, kw_number[i]);
        if (j == NULL)
            continue;
        if (!json_is_number(j))
            return einval(s, "%s must be a number", kw_number[i]);
        bool lower =
            strcmp(kw_number[i], "minimum") == 0 || strcmp(kw_number[i], "exclusiveMinimum") == 0;
        if (lower && json_number_value(j) == 0) {
            if (kw_number[i][0] == 'm')
                nonneg = true;
            else
                pos = true;
            continue;
        }
        char b[64];
        num_text(j, b, sizeof b);
        return einval(s,
                      "%s %s is not supported on numbers (only minimum 0 or exclusiveMinimum 0; "
                      "use type integer for other bounds)",
                      kw_number[i], b);
    }
    put(s, pos ? NUM_POS : nonneg ? NUM_NONNEG : NUM_RE);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Containers                                                                */
/* ------------------------------------------------------------------------ */

static int
gen_array(sch_t *s, const json_t *node)
{
    const json_t *items = json_object_get(node, "items"),
                 *prefix = json_object_get(node, "prefixItems");
    const char *items_kw = "items", *prefix_kw = "prefixItems";
    if (json_is_array(items)) {
        /* Drafts up to 2019-09 spelled prefixItems this way. */
        if (prefix != NULL)
            return einval(s, "items as an array alongside prefixItems is not supported");
        prefix = items;
        prefix_kw = "items";
        items = json_object_get(node, "additionalItems");
        items_kw = "additionalItems";
    }
    if (prefix != NULL && !json_is_array(prefix))
        return einval(s, "%s must be an array", prefix_kw);
    long long mn = 0, mx = -1, v;
    bool hmn, hmx;
    TRY(get_count(s, node, "minItems", SCH_MAX_ITEMS, &mn, &hmn));
    TRY(get_count(s, node, "maxItems", SCH_MAX_ITEMS, &v, &hmx));
    if (hmx)
        mx = v;
    if (hmx && mn > mx)
        return einval(s, "minItems %lld exceeds maxItems %lld", mn, mx);
    long long np = prefix != NULL ? (long long)json_array_size(prefix) : 0;

    /* The members after the prefix. */
    char *rest = NULL;
    bool rest_cut = false;
    if ((mx < 0 || mx > np) && !json_is_false(items)) {
        size_t mark = s->len;
        if (items == NULL) {
            put_any(s, SCH_ANY_DEPTH - 1);
        } else {
            size_t old = ptr_push(s, items_kw);
            int rc = gen(s, items);
            ptr_pop(s, old);
            if (rc == SCH_CUT) {
                trunc_to(s, mark);
                rest_cut = true;
            } else if (rc != 0) {
                return rc;
            }
        }
        if (!rest_cut && (rest = take(s, mark)) == NULL)
            return s->fail;
    }
    if (rest == NULL && mn > np) {
        if (rest_cut)
            return SCH_CUT;
        return einval(s, "minItems %lld needs more items than %s allows", mn,
                      np > 0 ? prefix_kw : "items false");
    }
    if (np == 0) {
        if (rest == NULL)
            put_list(s, "\\[", "\\]", "", 0, 0);
        else
            put_list(s, "\\[", "\\]", rest, mn, mx);
        free(rest);
        return s->fail;
    }

    long long ne = mx >= 0 && mx < np ? mx : np;
    char **pt = calloc((size_t)ne, sizeof *pt);
    int rc = 0;
    if (pt == NULL) {
        oom(s);
        rc = s->fail;
        goto out;
    }
    for (long long i = 0; i < ne; i++) {
        size_t old = ptr_push_idx(s, prefix_kw, (size_t)i);
        size_t mark = s->len;
        rc = gen(s, json_array_get(prefix, (size_t)i));
        ptr_pop(s, old);
        if (rc == SCH_CUT && i >= mn) {
            /* The array ends before the member that cannot be written. */
            trunc_to(s, mark);
            free(rest);
            rest = NULL;
            ne = i;
            rc = 0;
            break;
        }
        if (rc != 0)
            goto out;
        if ((pt[i] = take(s, mark)) == NULL) {
            rc = s->fail;
            goto out;
        }
    }
    put(s, "\\[");
    put_ws(s);
    if (ne > 0) {
        /* Member i is present only if member i-1 is: nest the optional ones. */
        if (mn == 0)
            put(s, "(?:");
        put(s, pt[0]);
        int closes = 0;
        for (long long i = 1; i < ne; i++) {
            if (i >= mn) {
                put(s, "(?:");
                closes++;
            }
            put_sep(s);
            put(s, pt[i]);
        }
        long long tlo = mn > np ? mn - np : 0, thi = mx < 0 ? -1 : mx - np;
        if (rest != NULL && ne == np && thi != 0) {
            put(s, "(?:");
            put_sep(s);
            put(s, rest);
            put(s, ")");
            put_quant(s, tlo, thi);
        }
        for (; closes > 0; closes--)
            put(s, ")?");
        put_ws(s);
        if (mn == 0)
            put(s, ")?");
    }
    put(s, "\\]");
    rc = s->fail;
out:
    for (long long i = 0; pt != NULL && i < ne; i++)
        free(pt[i]);
    free(pt);
    free(rest);
    return rc;
}

static bool
is_required(const json_t *req, const char *key)
{
    size_t i;
    const json_t *e;
    json_array_foreach(req, i, e) if (json_is_string(e) &&
                                      strcmp(json_string_value(e), key) == 0) return true;
    return false;
}

static int
gen_object(sch_t *s, const json_t *node)
{
    const json_t *props = json_object_get(node, "properties"),
                 *req = json_object_get(node, "required"),
                 *ap = json_object_get(node, "additionalProperties");
    if (props != NULL && !json_is_object(props))
        return einval(s, "properties must be an object");
    if (req != NULL) {
        size_t i;
        const json_t *e;
        if (!json_is_array(req))
            return einval(s, "required must be an array of strings");
        json_array_foreach(req, i, e) if (!json_is_string(e)) return einval(
            s, "required must be an array of strings");
    }
    if (ap != NULL && !json_is_boolean(ap) && !json_is_object(ap))
        return einval(s, "additionalProperties must be a schema");

    if (props == NULL) {
        if (req != NULL && json_array_size(req) > 0)
            return einval(s, "required without properties is not supported");
        if (json_is_false(ap)) {
            put_list(s, "\\{", "\\}", "", 0, 0);
            return s->fail;
        }
        size_t mark = s->len;
        if (ap == NULL || json_is_true(ap)) {
            put_any(s, SCH_ANY_DEPTH - 1);
        } else {
            size_t old = ptr_push(s, "additionalProperties");
            int rc = gen(s, ap);
            ptr_pop(s, old);
            if (rc == SCH_CUT) {
                trunc_to(s, mark);
                put_list(s, "\\{", "\\}", "", 0, 0);
                return s->fail;
            }
            if (rc != 0)
                return rc;
        }
        char *v = take(s, mark);
        if (v == NULL)
            return s->fail;
        put_map(s, v);
        free(v);
        return s->fail;
    }

    /* With properties, other keys are refused whatever additionalProperties
       says (vLLM and outlines do the same): a model that may invent keys
       rarely helps, and listing them exactly is what callers want. */
    if (json_is_object(ap) && other_kw(ap, (const char *const[]){NULL}) != NULL)
        return einval(s, "additionalProperties schema alongside properties is not supported");
    if (req != NULL) {
        size_t i;
        const json_t *e;
        json_array_foreach(
            req, i, e) if (json_object_get(props, json_string_value(e)) ==
                           NULL) return einval(s, "required property \"%s\" is not in properties",
                                               json_string_value(e));
    }
    size_t k = json_object_size(props), n = 0;
    char **pt = calloc(k > 0 ? k : 1, sizeof *pt);
    bool *rq = calloc(k > 0 ? k : 1, sizeof *rq);
    int rc = 0;
    if (pt == NULL || rq == NULL) {
        oom(s);
        rc = s->fail;
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)props, key, val)
    {
        bool r = req != NULL && is_required(req, key);
        size_t old = ptr_push(s, "properties");
        ptr_push(s, key);
        if (json_is_false(val)) {
            if (r) {
                rc = einval(s, "required property has schema false");
                goto out;
            }
            ptr_pop(s, old);
            continue; /* may not appear */
        }
        size_t mark = s->len;
        put_json_str(s, key, strlen(key));
        put_colon(s);
        rc = gen(s, val);
        ptr_pop(s, old);
        if (rc == SCH_CUT && !r) {
            trunc_to(s, mark);
            rc = 0;
            continue;
        }
        if (rc != 0)
            goto out;
        if ((pt[n] = take(s, mark)) == NULL) {
            rc = s->fail;
            goto out;
        }
        rq[n++] = r;
    }

    size_t first = 0;
    while (first < n && !rq[first])
        first++;
    put(s, "\\{");
    put_ws(s);
    if (first < n) {
        /* Anchor on the first required property: optional ones before it
           carry their comma after, those after it before. */
        for (size_t i = 0; i < first; i++) {
            put(s, "(?:");
            put(s, pt[i]);
            put_sep(s);
            put(s, ")?");
        }
        put(s, pt[first]);
        for (size_t i = first + 1; i < n; i++) {
            if (!rq[i])
                put(s, "(?:");
            put_sep(s);
            put(s, pt[i]);
            if (!rq[i])
                put(s, ")?");
        }
        put_ws(s);
    } else if (n > 0) {
        /* All optional: one alternative per property that comes first. */
        put(s, "(?:(?:");
        for (size_t i = 0; i < n; i++) {
            if (i > 0)
                put(s, "|");
            put(s, pt[i]);
            for (size_t j = i + 1; j < n; j++) {
                put(s, "(?:");
                put_sep(s);
                put(s, pt[j]);
                put(s, ")?");
            }
        }
        put(s, ")");
        put_ws(s);
        put(s, ")?");
    }
    put(s, "\\}");
    rc = s->fail;
out:
    for (size_t i = 0; pt != NULL && i < n; i++)
        free(pt[i]);
    free(pt);
    free(rq);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Combinators and $ref                                                      */
/* ------------------------------------------------------------------------ */

static int
gen_one_type(sch_t *s, const json_t *node, unsigned t)
{
    switch (t) {
    case T_OBJECT:
        return gen_object(s, node);
    case T_ARRAY:
        return gen_array(s, node);
    case T_STRING:
        return gen_string(s, node);
    case T_NUMBER:
        return gen_number(s, node);
    case T_INTEGER:
        return gen_integer(s, node);
    case T_BOOLEAN:
        put(s, "(?:true|false)");
        return 0;
    default:
        put(s, "null");
        return 0;
    }
}

static int
gen_types(sch_t *s, const json_t *node, unsigned mask)
{
    if (mask & T_NUMBER)
        mask &= ~(unsigned)T_INTEGER; /* number's texts include integer's */
    bool group = __builtin_popcount(mask) > 1;
    int n = 0;
    if (group)
        put(s, "(?:");
    for (unsigned t = 1; t <= T_NULL; t <<= 1) {
        if ((mask & t) == 0)
            continue;
        size_t mark = s->len;
        if (n > 0)
            put(s, "|");
        int rc = gen_one_type(s, node, t);
        if (rc == SCH_CUT) {
            trunc_to(s, mark);
            continue;
        }
        if (rc != 0)
            return rc;
        n++;
    }
    if (n == 0)
        return SCH_CUT;
    if (group)
        put(s, ")");
    return 0;
}

static int
gen_anyof(sch_t *s, const json_t *node)
{
    const json_t *any = json_object_get(node, "anyOf"), *one = json_object_get(node, "oneOf");
    if (any != NULL && one != NULL)
        return einval(s, "anyOf alongside oneOf is not supported");
    const char *kw = any != NULL ? "anyOf" : "oneOf";
    const json_t *list = any != NULL ? any : one;
    const char *other = other_kw(node, (const char *const[]){kw, NULL});
    if (other != NULL)
        return einval(s, "%s alongside %s is not supported", other, kw);
    if (!json_is_array(list) || json_array_size(list) == 0)
        return einval(s, "%s must be a non-empty array", kw);
    /* oneOf as anyOf: exclusivity would need the complement of each branch. */
    int n = 0;
    put(s, "(?:");
    size_t i;
    const json_t *e;
    json_array_foreach(list, i, e)
    {
        size_t mark = s->len;
        if (n > 0)
            put(s, "|");
        size_t old = ptr_push_idx(s, kw, i);
        int rc = gen(s, e);
        ptr_pop(s, old);
        if (rc == SCH_CUT) {
            trunc_to(s, mark);
            continue;
        }
        if (rc != 0)
            return rc;
        n++;
    }
    if (n == 0)
        return SCH_CUT;
    put(s, ")");
    return 0;
}

static int
gen_allof(sch_t *s, const json_t *node)
{
    const json_t *list = json_object_get(node, "allOf");
    if (!json_is_array(list) || json_array_size(list) != 1)
        return einval(s, "allOf with %zu schemas is not supported (only one)",
                      json_is_array(list) ? json_array_size(list) : 0);
    const char *other = other_kw(node, (const char *const[]){"allOf", NULL});
    if (other != NULL)
        return einval(s, "%s alongside allOf is not supported", other);
    size_t old = ptr_push_idx(s, "allOf", 0);
    int rc = gen(s, json_array_get(list, 0));
    ptr_pop(s, old);
    return rc;
}

/* "#/a/b~1c" -> the node it names; *frag: the pointer, %-decoded. */
static int
resolve_ref(sch_t *s, const char *ref, const json_t **target, char **frag)
{
    *frag = NULL;
    if (ref[0] != '#')
        return einval(s, "$ref \"%s\" is not supported (only \"#...\" pointers into this schema)",
                      ref);
    size_t n = strlen(ref + 1);
    char *f = malloc(n + 1), *tok = malloc(n + 1);
    if (f == NULL || tok == NULL) {
        free(f);
        free(tok);
        oom(s);
        return s->fail;
    }
    size_t m = 0;
    int rc = 0;
    for (const char *p = ref + 1; *p != '\0'; p++) {
        if (*p == '%') {
            int hi = kvs_hexval((unsigned char)p[1]),
                lo = hi >= 0 ? kvs_hexval((unsigned char)p[2]) : -1;
            if (lo < 0) {
                rc = einval(s, "$ref \"%s\" has a bad %%-escape", ref);
                goto out;
            }
            f[m++] = (char)(hi << 4 | lo);
            p += 2;
        } else {
            f[m++] = *p;
        }
    }
    f[m] = '\0';
    if (f[0] != '\0' && f[0] != '/') {
        rc = einval(s, "$ref \"%s\": anchors are not supported, only JSON pointers", ref);
        goto out;
    }
    const json_t *cur = s->root;
    for (const char *p = f; *p == '/';) {
        size_t t = 0;
        for (p++; *p != '\0' && *p != '/'; p++) {
            if (*p == '~') {
                if (p[1] != '0' && p[1] != '1') {
                    rc = einval(s, "$ref \"%s\" has a bad ~-escape", ref);
                    goto out;
                }
                tok[t++] = p[1] == '0' ? '~' : '/';
                p++;
            } else {
                tok[t++] = *p;
            }
        }
        tok[t] = '\0';
        if (json_is_object(cur)) {
            cur = json_object_get(cur, tok);
        } else if (json_is_array(cur) && t > 0 && strspn(tok, "0123456789") == t &&
                   (t == 1 || tok[0] != '0')) {
            cur = json_array_get(cur, strtoull(tok, NULL, 10));
        } else {
            cur = NULL;
        }
        if (cur == NULL) {
            rc = einval(s, "$ref \"%s\" does not resolve", ref);
            goto out;
        }
    }
    *target = cur;
    *frag = f;
    f = NULL;
out:
    free(f);
    free(tok);
    return rc;
}

static int
gen_ref(sch_t *s, const json_t *node)
{
    const char *other = other_kw(node, (const char *const[]){"$ref", NULL});
    if (other != NULL)
        return einval(s, "%s alongside $ref is not supported", other);
    const char *ref = json_string_value(json_object_get(node, "$ref"));
    if (ref == NULL)
        return einval(s, "$ref must be a string");
    const json_t *target = NULL;
    char *frag;
    TRY(resolve_ref(s, ref, &target, &frag));
    int same = 0;
    for (int i = 0; i < s->nrefs; i++)
        same += s->refs[i] == target;
    if (same >= SCH_REF_DEPTH) {
        free(frag);
        snprintf(s->cut_msg, sizeof s->cut_msg,
                 "%.200s: recursive $ref \"%.64s\" nests deeper than %d where it is required",
                 s->plen > 0 ? s->ptr : "/", ref, SCH_REF_DEPTH);
        return SCH_CUT;
    }
    /* Messages inside name the definition, where the fix goes. */
    char *saved = strdup(s->plen > 0 ? s->ptr : "");
    if (saved == NULL) {
        free(frag);
        oom(s);
        return s->fail;
    }
    ptr_set(s, frag);
    s->refs[s->nrefs++] = target;
    int rc = gen(s, target);
    s->nrefs--;
    ptr_set(s, saved);
    free(saved);
    free(frag);
    return rc;
}

static int
gen_schema(sch_t *s, const json_t *node)
{
    if (json_is_true(node)) {
        put_any(s, SCH_ANY_DEPTH);
        return 0;
    }
    if (json_is_false(node))
        return einval(s, "schema false accepts nothing");
    if (!json_is_object(node))
        return einval(s, "a schema must be an object or a boolean");
    for (const char *const *k = kw_unsupported; *k != NULL; k++)
        if (json_object_get(node, *k) != NULL)
            return einval(s, "%s is not supported", *k);
    if (json_is_true(json_object_get(node, "uniqueItems")))
        return einval(s, "uniqueItems is not supported");
    if (json_object_get(node, "$ref") != NULL)
        return gen_ref(s, node);
    if (json_object_get(node, "allOf") != NULL)
        return gen_allof(s, node);
    if (json_object_get(node, "anyOf") != NULL || json_object_get(node, "oneOf") != NULL)
        return gen_anyof(s, node);
    if (json_object_get(node, "enum") != NULL || json_object_get(node, "const") != NULL)
        return gen_enum(s, node);
    unsigned mask = 0;
    if (json_object_get(node, "type") != NULL) {
        TRY(parse_type(s, node, &mask));
    } else {
        mask |= has_any(node, kw_object) ? T_OBJECT : 0;
        mask |= has_any(node, kw_array) ? T_ARRAY : 0;
        mask |= has_any(node, kw_string) ? T_STRING : 0;
        mask |= has_any(node, kw_number) ? T_NUMBER : 0;
    }
    if (mask == 0) {
        put_any(s, SCH_ANY_DEPTH);
        return 0;
    }
    return gen_types(s, node, mask);
}

static int
gen(sch_t *s, const json_t *node)
{
    if (s->depth >= SCH_MAX_NEST)
        return einval(s, "the schema nests deeper than %d levels", SCH_MAX_NEST);
    s->depth++;
    int rc = gen_schema(s, node);
    s->depth--;
    return s->fail != 0 ? s->fail : rc;
}

int
srv_schema_regex(const char *schema, size_t len, const char *ws, char **out, char *err,
                 size_t err_len)
{
    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (out == NULL || schema == NULL) {
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "no schema");
        return KVS_EINVAL;
    }
    *out = NULL;
    json_error_t je;
    json_t *root = json_loadb(schema, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &je);
    if (root == NULL) {
        if (json_error_code(&je) == json_error_out_of_memory)
            return KVS_ENOMEM;
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "line %d column %d: %s", je.line, je.column, je.text);
        return KVS_EINVAL;
    }
    sch_t s = {.root = root, .err = err, .err_len = err_len};
    char *wsbuf = NULL;
    if (ws == NULL)
        ws = SRV_SCHEMA_WS;
    /* A caller's alternation must not swallow its neighbours. */
    if (strchr(ws, '|') != NULL) {
        size_t n = strlen(ws) + 5;
        if ((wsbuf = malloc(n)) != NULL)
            snprintf(wsbuf, n, "(?:%s)", ws);
    }
    s.ws = wsbuf != NULL ? wsbuf : ws;
    int rc;
    if ((strchr(ws, '|') != NULL && wsbuf == NULL) || !reserve(&s, 0) || !ptr_grow(&s, 0)) {
        rc = KVS_ENOMEM;
    } else {
        rc = gen(&s, root);
        if (rc == SCH_CUT) {
            if (err != NULL && err_len > 0)
                snprintf(err, err_len, "%s", s.cut_msg);
            rc = KVS_EINVAL;
        }
    }
    if (rc == 0) {
        char *p = realloc(s.out, s.len + 1);
        *out = p != NULL ? p : s.out;
        s.out = NULL;
    }
    free(s.out);
    free(s.ptr);
    free(wsbuf);
    json_decref(root);
    return rc;
}

int
srv_guide_new(const model_t *m, const char *grammar, const char *regex, const char *json,
              const char *ws, model_guide_t **out, const char **field, char *err, size_t err_len)
{
    *out = NULL;
    if (grammar) {
        *field = "guided_grammar";
        return model_guide_new_grammar(m, grammar, strlen(grammar), out, err, err_len);
    }
    if (regex) {
        *field = "guided_regex";
        return model_guide_new(m, regex, strlen(regex), out, err, err_len);
    }
    /* The whitespace pattern alone first: its complaints name it, not an
     * offset in the schema's pattern. */
    *field = "guided_whitespace_pattern";
    if (ws) {
        model_guide_t *w;
        int rc = model_guide_new(m, ws, strlen(ws), &w, err, err_len);
        if (rc)
            return rc;
        model_guide_free(w);
    }
    *field = "guided_json";
    char *pattern;
    int rc = srv_schema_regex(json, strlen(json), ws, &pattern, err, err_len);
    if (rc == 0) {
        rc = model_guide_new(m, pattern, strlen(pattern), out, err, err_len);
        free(pattern);
    }
    return rc;
}
