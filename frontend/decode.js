// Binary frame decoding (docs/protocol.md, "Binary data frames").
// Pure functions: no DOM, no network. Layout of one frame:
//   uint32 LE n | n bytes UTF-8 JSON header (space-padded, 4 + n % 8 == 0) | payload (C order, LE)

const HALF_TABLE = buildHalfTable();
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const textDecoder = new TextDecoder("utf-8");

/** Convert one IEEE 754 half-precision bit pattern (0..65535) to a JS number. */
export function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24; // zero and subnormals
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

function buildHalfTable() {
  const table = new Float32Array(65536);
  for (let i = 0; i < 65536; i++) table[i] = halfToFloat(i);
  return table;
}

/** Decode little-endian float16 bytes into a new Float32Array of `count` values. */
export function decodeFloat16(buffer, byteOffset, count) {
  const out = new Float32Array(count);
  if (LITTLE_ENDIAN && byteOffset % 2 === 0) {
    const bits = new Uint16Array(buffer, byteOffset, count);
    for (let i = 0; i < count; i++) out[i] = HALF_TABLE[bits[i]];
  } else {
    const view = new DataView(buffer, byteOffset, count * 2);
    for (let i = 0; i < count; i++) out[i] = HALF_TABLE[view.getUint16(2 * i, true)];
  }
  return out;
}

/** Decode quantised bytes: value = offset + scale * byte. */
export function decodeUint8(buffer, byteOffset, count, scale, offset) {
  const bytes = new Uint8Array(buffer, byteOffset, count);
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) out[i] = offset + scale * bytes[i];
  return out;
}

/** Error raised for a frame that does not follow the protocol; `field` names the culprit. */
export class FrameError extends Error {
  constructor(field, message) {
    super(`bad frame field '${field}': ${message}`);
    this.field = field;
  }
}

const BYTES_PER = { float16: 2, uint8: 1 };

/**
 * Parse one binary frame.
 * @param {ArrayBuffer} buffer the whole websocket message
 * @returns {{header: object, data: Float32Array, shape: number[]}} data in C order
 */
export function parseFrame(buffer) {
  if (!(buffer instanceof ArrayBuffer)) throw new FrameError("buffer", "expected an ArrayBuffer");
  if (buffer.byteLength < 4) throw new FrameError("length", `${buffer.byteLength} bytes is too short`);
  const headerLength = new DataView(buffer).getUint32(0, true);
  if (4 + headerLength > buffer.byteLength) {
    throw new FrameError("length", `header length ${headerLength} exceeds frame of ${buffer.byteLength} bytes`);
  }
  let header;
  try {
    header = JSON.parse(textDecoder.decode(new Uint8Array(buffer, 4, headerLength)));
  } catch (err) {
    throw new FrameError("header", `not JSON (${err.message})`);
  }
  const shape = header.shape;
  if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
    throw new FrameError("shape", `expected a list of non-negative ints, got ${JSON.stringify(shape)}`);
  }
  const bytesPer = BYTES_PER[header.dtype];
  if (!bytesPer) throw new FrameError("dtype", `expected float16 or uint8, got ${JSON.stringify(header.dtype)}`);
  const count = shape.reduce((a, b) => a * b, 1);
  const payloadOffset = 4 + headerLength;
  const payloadBytes = buffer.byteLength - payloadOffset;
  if (payloadBytes !== count * bytesPer) {
    throw new FrameError("shape", `shape ${JSON.stringify(shape)} needs ${count * bytesPer} payload bytes, got ${payloadBytes}`);
  }
  let data;
  if (header.dtype === "float16") {
    data = decodeFloat16(buffer, payloadOffset, count);
  } else {
    const { scale, offset } = header;
    if (typeof scale !== "number" || typeof offset !== "number") {
      throw new FrameError("scale", "uint8 frames need numeric scale and offset");
    }
    data = decodeUint8(buffer, payloadOffset, count, scale, offset);
  }
  return { header, data, shape };
}
