/**
 * Case 4: the peer a Node.js team would otherwise pick: @aws-crypto/client-node with a
 * RawAesKeyringNode, its default suite (signing) and the committing suite without signatures,
 * encrypt and decrypt of the same 1 KiB payloads. The KMS figure is the embedded encrypt/decrypt
 * at 256 callers; the target is held against the non-signing suite.
 */
import { randomBytes } from 'node:crypto';
import {
  AlgorithmSuiteIdentifier,
  buildClient,
  CommitmentPolicy,
  RawAesKeyringNode,
  RawAesWrappingSuiteIdentifier,
} from '@aws-crypto/client-node';
import {
  alternate,
  type BenchContext,
  type CaseReport,
  closedLoop,
  fmt,
  medians,
  metric,
  payloadOf,
  tempKms,
} from '../lib.js';

export const caseNo = 4;
export const name = 'peer';

const NON_SIGNING = AlgorithmSuiteIdentifier.ALG_AES256_GCM_IV12_TAG16_HKDF_SHA512_COMMIT_KEY;

export async function run(ctx: BenchContext): Promise<CaseReport> {
  const payload = payloadOf(1024);
  const { encrypt, decrypt } = buildClient(CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT);
  const keyring = new RawAesKeyringNode({
    keyName: 'bench-key',
    keyNamespace: 'progressdb-bench',
    unencryptedMasterKey: randomBytes(32),
    wrappingSuite: RawAesWrappingSuiteIdentifier.AES256_GCM_IV12_TAG16_NO_PADDING,
  });
  const awsDefault = (await encrypt(keyring, payload)).result;
  const awsNonSigning = (await encrypt(keyring, payload, { suiteId: NON_SIGNING })).result;
  const { kms, dispose } = await tempKms();
  try {
    const { keyId } = await kms.createDekForThread('bench-peer');
    const { ciphertext } = await kms.encrypt(keyId, payload);
    // The peer is asynchronous but does its crypto on the main thread; 16 callers keep it busy.
    const peerLoop = (op: () => Promise<unknown>) => closedLoop(16, ctx.ms, op).then((r) => r.opsPerSec);
    const kmsLoop = (op: () => Promise<unknown>) => closedLoop(256, ctx.ms, op).then((r) => r.opsPerSec);
    await kmsLoop(() => kms.encrypt(keyId, payload));
    await closedLoop(16, 200, () => encrypt(keyring, payload, { suiteId: NON_SIGNING }));
    const samples = await alternate(
      ctx.rounds,
      {
        kmsEncrypt: () => kmsLoop(() => kms.encrypt(keyId, payload)),
        kmsDecrypt: () => kmsLoop(() => kms.decrypt(keyId, ciphertext)),
        awsNonSigningEncrypt: () => peerLoop(() => encrypt(keyring, payload, { suiteId: NON_SIGNING })),
        awsNonSigningDecrypt: () => peerLoop(() => decrypt(keyring, awsNonSigning)),
        awsDefaultEncrypt: () => peerLoop(() => encrypt(keyring, payload)),
        awsDefaultDecrypt: () => peerLoop(() => decrypt(keyring, awsDefault)),
      },
      (r, last) =>
        ctx.progress(
          `  round ${r + 1}/${ctx.rounds}: kms enc ${fmt(last.kmsEncrypt)}/s, aws non-signing enc ` +
            `${fmt(last.awsNonSigningEncrypt)}/s, aws default enc ${fmt(last.awsDefaultEncrypt)}/s`,
        ),
    );
    const med = medians(samples);
    const m = (op: 'encrypt' | 'decrypt', suite: 'non-signing' | 'default') =>
      metric({
        id: `peer_${op}${suite === 'default' ? '_default_suite' : ''}`,
        caseNo,
        title: `embedded ${op} 1 KiB vs @aws-crypto/client-node ${suite} suite`,
        figure: op === 'encrypt' ? med.kmsEncrypt : med.kmsDecrypt,
        figureLabel: `KMS ${op}@256`,
        baseline:
          suite === 'default'
            ? op === 'encrypt'
              ? med.awsDefaultEncrypt
              : med.awsDefaultDecrypt
            : op === 'encrypt'
              ? med.awsNonSigningEncrypt
              : med.awsNonSigningDecrypt,
        baselineLabel: `aws ${suite}`,
        unit: 'ops/s',
        target: 30,
        better: 'higher',
      });
    const defaults = [m('encrypt', 'default'), m('decrypt', 'default')];
    return {
      metrics: [m('encrypt', 'non-signing'), m('decrypt', 'non-signing')],
      details: {
        medians: Object.fromEntries(Object.entries(med).map(([k, v]) => [k, Math.round(v)])),
        defaultSuiteRatios: defaults.map((d) => ({ id: d.id, ratio: d.ratio })),
      },
      notes: [
        'peer: RawAesKeyringNode, committing suite without signatures (target) and the default ' +
          `signing suite (details: encrypt ${defaults[0]!.ratio}×, decrypt ${defaults[1]!.ratio}×)`,
      ],
    };
  } finally {
    await dispose();
  }
}
