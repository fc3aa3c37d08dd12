/*
 * serve/srv_schema.h — vLLM's guided_json: a JSON schema compiled into the
 * regular expression that model/guide.c turns into a token DFA.  Called by
 * serve/ when a request carries a schema; a pure function, any thread.
 *
 * The regex uses only the dialect guide.c accepts (literals, escapes,
 * classes over code points, (?:...), |, * + ? {n,m} with n, m <= 1000), and
 * is matched against the whole output.  Supported (JSON Schema 2020-12 as
 * pydantic writes it):
 *   - true / {}: any JSON value whose arrays and objects nest at most 3
 *     deep; an object or array with no properties/items schema holds such
 *     values one level shallower, so it too stops at 3.
 *   - type (a name or a list), else inferred from the keywords present
 *     (properties -> object, items -> array, minLength -> string, minimum ->
 *     number); enum and const (filtered by type; other keywords beside them
 *     are refused).
 *   - string: minLength/maxLength (<= 1000; an escape counts as one char),
 *     pattern (our dialect, ^ and $ stripped, a full match of the decoded
 *     content: each character it allows is emitted in its one canonical
 *     JSON spelling, so '"' becomes \" and controls \n or \u00XX), format
 *     date, time, date-time (RFC 3339, no leap second 60) and uuid.
 *   - integer: exact ranges from minimum/maximum/exclusive* (integral
 *     values only); a bounded range never admits "-0".  number: no bound,
 *     minimum 0 or exclusiveMinimum 0 only.
 *   - array: items, prefixItems (or items as a list + additionalItems),
 *     minItems/maxItems <= 100.
 *   - object: properties in schema order (the output lists them in that
 *     order), required; additionalProperties absent/true/false all mean "no
 *     other keys" beside properties (as vLLM/outlines do); without
 *     properties, an additionalProperties schema gives a map, false gives {}
 *     and absent/true any object.
 *   - anyOf and oneOf (treated as anyOf) as alternation, allOf of one
 *     schema; $ref to "#" or "#/..." pointers (%-escapes, ~0, ~1).  One $ref
 *     expands at most 3 times along a path; the 4th is dropped where it is
 *     optional (optional property, anyOf branch, items of an array that may
 *     be empty), else the schema is refused.
 * Annotations (title, description, default, examples, ...) and unknown
 * keywords are ignored; known constraints not listed (not, if, multipleOf,
 * uniqueItems: true, patternProperties, minProperties, ...) are refused.
 * Limits: 32 levels of schema nesting, 1 MiB of regex.
 */
#ifndef SRV_SCHEMA_H
#define SRV_SCHEMA_H

#include "model/model.h"

#include <stddef.h>

/* Default whitespace between JSON tokens: at most one space (compact or
   "a": 1, b-style JSON), as vLLM's outlines backend does.  Any more lets a
   model spend its tokens on blanks: a greedy model that likes spaces takes
   the most a bounded run allows at every position.  Pretty-printing is a
   request's guided_whitespace_pattern away. */
#define SRV_SCHEMA_WS "[ ]?"

/* A regular expression whose full matches are exactly the JSON texts (within
   the subset above) that the schema schema[0..len) accepts.  ws: the pattern
   allowed wherever JSON allows whitespace between tokens, never before or
   after the document (NULL: SRV_SCHEMA_WS).  Returns 0 and a malloc'd
   NUL-terminated regex in *out; KVS_EINVAL with a message in err naming the
   schema location as a JSON pointer ("/properties/age") and the keyword
   that cannot be honoured, or "line L column C: ..." for malformed JSON; or
   KVS_ENOMEM.  err may be NULL. */
int srv_schema_regex(const char *schema, size_t len, const char *ws, char **out, char *err,
                     size_t err_len);

/* A request's guide: the GBNF grammar (model_guide_new_grammar), else the
   pattern regex, else the schema json (with ws as above) compiled by
   model_guide_new.  Returns 0 with *out, or KVS_EINVAL / KVS_ENOMEM with the
   complaint in err and *field naming the part at fault ("guided_grammar",
   "guided_regex", "guided_json" or "guided_whitespace_pattern"). */
int srv_guide_new(const model_t *m, const char *grammar, const char *regex, const char *json,
                  const char *ws, model_guide_t **out, const char **field, char *err,
                  size_t err_len);

#endif
