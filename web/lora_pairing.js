// Which expert a LoRA file name marks, and its partner file for the other expert.
// Same rule as training/lora_pairing.py (tests/test_web_pairing.py checks they agree):
// only expert markers count: "high_noise"/"high-noise"/"highnoise" (lower, Capitalised,
// UPPER, camel-case "HighNoise") and "HIGH" as a whole upper-case token ("_HIGH_",
// "-HIGH."), and the "low" equivalents; not "mps_low_light", "high_detail", "low-res".
// The partner swaps every marker, keeping its case.

const MARKER = new RegExp(
  "(?<![A-Za-z])(?:high|low|High|Low|HIGH|LOW)(?=[_-]?(?:noise|Noise|NOISE))" +
    "|(?<=[a-z])(?:High|Low)(?=Noise)" +
    "|(?<![A-Za-z0-9])(?:HIGH|LOW)(?![A-Za-z0-9])",
  "g",
);
const SWAP = { high: "low", low: "high" };

function sameCase(word, like) {
  if (like === like.toUpperCase()) return word.toUpperCase();
  if (like[0] === like[0].toUpperCase()) return word[0].toUpperCase() + word.slice(1);
  return word;
}

function basename(name) {
  return name.replace(/\\/g, "/").split("/").pop();
}

export function expertOf(name) {
  const kinds = new Set([...basename(name || "").matchAll(MARKER)].map((m) => m[0].toLowerCase()));
  return kinds.size === 1 ? [...kinds][0] : null;
}

export function swapMarkers(name) {
  return name.replace(MARKER, (m) => sameCase(SWAP[m.toLowerCase()], m));
}

export function partnerName(name, available) {
  if (!name || expertOf(name) === null) return null;
  const names = new Set(available);
  const path = name.replace(/\\/g, "/");
  const cut = path.lastIndexOf("/");
  const candidates = [swapMarkers(name), path.slice(0, cut + 1) + swapMarkers(path.slice(cut + 1))];
  for (const candidate of candidates) {
    if (candidate !== name && names.has(candidate)) return candidate;
  }
  return null;
}
