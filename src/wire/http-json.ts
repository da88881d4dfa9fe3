/**
 * The size of the daemon's HTTP JSON bodies (the fields themselves are declared with each
 * operation in src/ops/): every value travels as a JSON string, binary as standard base64.
 */
import { MAX_AAD_BYTES, MAX_CIPHERTEXT_BYTES, MAX_ID_LENGTH } from '../kms/validate-args.js';

/** Characters of the padded base64 of `bytes` bytes. */
const base64Length = (bytes: number) => 4 * Math.ceil(bytes / 3);
/** A JSON encoder may write any character of an id as a `\uXXXX` escape: 6 bytes per UTF-16 unit. */
const MAX_ID_JSON_BYTES = MAX_ID_LENGTH * 6;
/** Field names, quotes, brackets and room for a pretty-printing client's whitespace. */
const JSON_ENVELOPE_BYTES = 1024;
/**
 * The largest request body one operation on the largest input the KMS accepts needs:
 * `{"batch_input":[{"key_id","ciphertext","aad"}]}` with the longest id, the largest ciphertext
 * and the largest AAD in base64 (4/3 of their size). Answers to it are smaller.
 */
export const MAX_OP_BODY_BYTES =
  base64Length(MAX_CIPHERTEXT_BYTES) + base64Length(MAX_AAD_BYTES) + MAX_ID_JSON_BYTES + JSON_ENVELOPE_BYTES;
