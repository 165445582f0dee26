import AxeBuilder from "@axe-core/playwright";
import { test as base, expect, type Page } from "@playwright/test";
import { mkdirSync } from "node:fs";
import { fileURLToPath } from "node:url";

export const user = process.env.OPSMESH_E2E_USER ?? "dev";
export const password = process.env.OPSMESH_E2E_PASSWORD ?? "";
const shots = fileURLToPath(new URL("../../build/e2e/screenshots/", import.meta.url));

/** Every test fails on a console error or an uncaught exception in the page, unless the test
 * names the errors it provokes. */
export const test = base.extend<{ consoleErrors: string[]; allowConsoleErrors: RegExp[] }>({
  allowConsoleErrors: [[], { option: true }],
  consoleErrors: async ({ page, allowConsoleErrors }, use) => {
    const errors: string[] = [];
    page.on("console", (message) => {
      if (message.type() === "error") errors.push(message.text());
    });
    page.on("pageerror", (error) => errors.push(String(error)));
    await use(errors);
    const unexpected = errors.filter((e) => !allowConsoleErrors.some((allowed) => allowed.test(e)));
    expect(unexpected, "console errors").toEqual([]);
  },
});
export { expect };

export async function screenshot(page: Page, name: string): Promise<void> {
  mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: `${shots}${name}.png`, fullPage: true });
}

/** Signs in through the authorization server's page: the dev admin unless told who. */
export async function signIn(page: Page, who: { user: string; password: string } = { user, password }): Promise<void> {
  await page.goto("/");
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByRole("heading", { name: "Sign in to opsmesh" })).toBeVisible();
  await page.getByLabel("User").fill(who.user);
  await page.getByLabel("Password").fill(who.password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByTestId("identity")).toContainText(who.user);
  await expect(page).toHaveURL(/\/$/); // the code left the address bar
}

/** Starts a chat and waits until it is the open one: its message box takes the focus only then,
 * so nothing typed lands in the chat that was open before. */
export async function newChat(page: Page, how: "click" | "keyboard" = "click"): Promise<void> {
  const button = page.getByRole("button", { name: "New chat" });
  if (how === "keyboard") {
    await button.focus();
    await page.keyboard.press("Enter");
  } else {
    await button.click();
  }
  await expect(page.getByLabel("Message")).toBeFocused();
}

/** No WCAG 2.1 A/AA violation that axe can find on the page as it is now. */
export async function expectAccessible(page: Page): Promise<void> {
  const { violations } = await new AxeBuilder({ page })
    .withTags(["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"])
    .setLegacyMode(true)
    .analyze();
  const found = violations.map((v) => `${v.id} (${v.impact ?? "?"}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
  expect(found, "accessibility violations").toEqual([]);
}
