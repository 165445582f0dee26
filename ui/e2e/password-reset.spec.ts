import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import type { Page } from "@playwright/test";
import { expect, expectAccessible, password, screenshot, test, user } from "./fixtures";

// The dev user's address (devtools/stack.py DEV_USER_EMAIL) and the mail sink's Maildir.
const email = "dev@example.com";
const mailDir = join(process.env.OPSMESH_RUN_DIR ?? ".run", "mail");

/** The body of a stored message as text: quoted-printable unfolded, base64 parts decoded. */
function readable(raw: string): string {
  const unfolded = raw.replace(/=\r?\n/g, "").replace(/=3D/gi, "=");
  const decoded = [...raw.matchAll(/\r?\n\r?\n([A-Za-z0-9+/=\r\n]{40,})/g)].map((m) =>
    Buffer.from(m[1].replace(/\s/g, ""), "base64").toString("utf8"),
  );
  return [unfolded, ...decoded].join("\n");
}

/** The reset links mailed to the dev user so far, oldest first. */
function resetLinks(): string[] {
  const files = ["new", "cur"].flatMap((box) => {
    try {
      return readdirSync(join(mailDir, box)).map((name) => join(mailDir, box, name));
    } catch {
      return [];
    }
  });
  files.sort((a, b) => statSync(a).mtimeMs - statSync(b).mtimeMs);
  return files
    .map((file) => readable(readFileSync(file, "utf8")))
    .filter((text) => text.includes(email))
    .flatMap((text) => [...text.matchAll(/https?:\/\/[^\s"<>]+\/account\/password\/reset\?token=[A-Za-z0-9_-]+/g)].map((m) => m[0]))
    .filter((link, index, all) => all.indexOf(link) === index);
}

async function askForLink(page: Page, from: "sign-in" | "direct"): Promise<string> {
  const before = resetLinks().length;
  if (from === "sign-in") {
    await page.goto("/");
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("link", { name: "Forgot password?" }).click();
  } else {
    await page.goto("/account/password/forgot");
  }
  await expect(page.getByRole("heading", { name: "Reset your password" })).toBeVisible();
  await expectAccessible(page);
  await page.getByLabel("User name or email").fill(user);
  await page.getByRole("button", { name: "Send the link" }).click();
  await expect(page.getByRole("heading", { name: "Check your email" })).toBeVisible();
  await expectAccessible(page);
  await expect.poll(() => resetLinks().length, { timeout: 30_000 }).toBeGreaterThan(before);
  return resetLinks().at(-1) ?? "";
}

async function choosePassword(page: Page, link: string, chosen: string): Promise<void> {
  await page.goto(link);
  await expect(page.getByRole("heading", { name: "Choose a new password" })).toBeVisible();
  await expectAccessible(page);
  await page.getByLabel("New password", { exact: true }).fill(chosen);
  await page.getByLabel("Repeat the new password").fill(chosen);
  await page.getByRole("button", { name: "Set the new password" }).click();
  await expect(page.getByRole("heading", { name: "Your password is changed" })).toBeVisible();
  await expect(page).toHaveURL(/\/account\/password\/reset$/); // the token left the address bar
}

test("forgot password: the emailed link sets a new password once, and the old one stops working", async ({ page }) => {
  const link = await askForLink(page, "sign-in");
  await choosePassword(page, link, "a new password for the e2e run");
  await expectAccessible(page);
  await screenshot(page, "reset-01-changed");

  // The link works once.
  await page.goto(link);
  await expect(page.getByRole("heading", { name: "This link was already used" })).toBeVisible();
  await expectAccessible(page);

  // The old password no longer signs in; the new one does.
  await page.goto("/");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByLabel("User name").fill(user);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByRole("alert")).toContainText("Wrong user or password");
  await page.getByLabel("Password").fill("a new password for the e2e run");
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByTestId("identity")).toContainText(user);

  // Back to the stack's password, for the scenarios after this one.
  await choosePassword(page, await askForLink(page, "direct"), password);
});
