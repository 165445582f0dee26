import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { expect } from "@playwright/test";

/** The dev mail sink's Maildir (devtools/mailsink.py): `mail` in the stack's run directory
 * (OPSMESH_RUN_DIR, as tests/test_web_e2e.py sets it; `make up`'s .run otherwise). */
export const mailDir = join(process.env.OPSMESH_RUN_DIR ?? fileURLToPath(new URL("../../.run", import.meta.url)), "mail");

/** The link of the org_invitation email (identity's page, identity_svc/invitation_pages.py). */
export const INVITATION_LINK = /https?:\/\/[^\s"'<>]+\/invitations\/accept\?token=[A-Za-z0-9_-]+/;

interface Part {
  readonly headers: Map<string, string>;
  readonly body: string;
}

function parsePart(raw: string): Part {
  const split = raw.search(/\r?\n\r?\n/);
  const head = split < 0 ? raw : raw.slice(0, split);
  const body = split < 0 ? "" : raw.slice(split).replace(/^\r?\n\r?\n/, "");
  const headers = new Map<string, string>();
  for (const line of head.replace(/\r?\n[ \t]+/g, " ").split(/\r?\n/)) {
    const colon = line.indexOf(":");
    if (colon > 0) headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
  }
  return { headers, body };
}

function decode(part: Part): string {
  const encoding = (part.headers.get("content-transfer-encoding") ?? "").toLowerCase();
  if (encoding === "base64") return Buffer.from(part.body.replace(/\s+/g, ""), "base64").toString("utf8");
  if (encoding === "quoted-printable") {
    const bytes = part.body
      .replace(/=\r?\n/g, "")
      .replace(/=([0-9A-Fa-f]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)));
    return Buffer.from(bytes, "latin1").toString("utf8");
  }
  return part.body;
}

/** The decoded text of every leaf part of a MIME message (plain text and HTML alike). */
function texts(part: Part): string[] {
  const type = part.headers.get("content-type") ?? "text/plain";
  const boundary = /boundary="?([^";]+)"?/i.exec(type)?.[1];
  if (!type.toLowerCase().startsWith("multipart/") || !boundary) return [decode(part)];
  const pieces = part.body.split(`--${boundary}`).slice(1);
  return pieces.filter((piece) => !piece.startsWith("--")).flatMap((piece) => texts(parsePart(piece.replace(/^\r?\n/, ""))));
}

interface Mail {
  readonly to: string;
  readonly subject: string;
  readonly texts: string[];
  /** When the sink stored it (epoch ms). */
  readonly stored: number;
}

/** Every message the sink holds, oldest first. */
function messages(): Mail[] {
  const found: Mail[] = [];
  for (const folder of ["new", "cur"]) {
    let names: string[] = [];
    try {
      names = readdirSync(join(mailDir, folder));
    } catch {
      continue; // the sink has not stored anything yet
    }
    for (const name of names) {
      const path = join(mailDir, folder, name);
      const message = parsePart(readFileSync(path, "latin1"));
      found.push({
        to: message.headers.get("to") ?? "",
        subject: message.headers.get("subject") ?? "",
        texts: texts(message),
        stored: statSync(path).mtimeMs,
      });
    }
  }
  return found.sort((a, b) => a.stored - b.stored);
}

/** Waits for a message to `address` stored at or after `since` (epoch ms) whose text holds a link
 * matching `link`, and returns the link of the newest such message. */
export async function linkMailedTo(address: string, link: RegExp, since: number): Promise<string> {
  let found = "";
  await expect
    .poll(
      () => {
        // Maildir file times have a second's precision on some file systems.
        const recent = messages().filter((m) => m.to.includes(address) && m.stored >= since - 1000);
        for (const message of recent) {
          for (const text of message.texts) {
            const match = link.exec(text.replace(/&amp;/g, "&"));
            if (match) found = match[0];
          }
        }
        return found;
      },
      { message: `an email to ${address} with a link like ${link} in ${mailDir}`, timeout: 30_000 },
    )
    .not.toBe("");
  return found;
}
