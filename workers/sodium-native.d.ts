// The part of sodium-native (libsodium bindings) the workers use; the package ships no types.
declare module 'sodium-native' {
  interface SodiumNative {
    sodium_malloc(size: number): Buffer & { secure: true };
    sodium_free(buf: Buffer): void;
    sodium_mlock(buf: Uint8Array): void;
    sodium_memzero(buf: Uint8Array): void;
    randombytes_buf(buf: Uint8Array): void;
    crypto_sign_seed_keypair(pk: Uint8Array, sk: Uint8Array, seed: Uint8Array): void;
    crypto_sign_detached(sig: Uint8Array, m: Uint8Array, sk: Uint8Array): void;
    crypto_sign_SECRETKEYBYTES: number;
    crypto_aead_xchacha20poly1305_ietf_encrypt(
      c: Uint8Array,
      m: Uint8Array,
      ad: Uint8Array | null,
      nsec: null,
      npub: Uint8Array,
      k: Uint8Array,
    ): number;
    crypto_aead_xchacha20poly1305_ietf_decrypt(
      m: Uint8Array,
      nsec: null,
      c: Uint8Array,
      ad: Uint8Array | null,
      npub: Uint8Array,
      k: Uint8Array,
    ): number;
  }
  const sodium: SodiumNative;
  export default sodium;
}
