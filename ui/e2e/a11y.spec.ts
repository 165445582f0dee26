import { expect, expectAccessible, newChat, signIn, test } from "./fixtures";

test("every screen passes axe's WCAG 2.1 AA checks", async ({ page }) => {
  await page.goto("/");
  await expect(page.getByRole("button", { name: "Sign in" })).toBeVisible();
  await expectAccessible(page);

  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByRole("heading", { name: "Sign in to opsmesh" })).toBeVisible();
  await expectAccessible(page); // the authorization server's own sign-in page

  await signIn(page);
  await newChat(page);
  await page.getByLabel("Message").fill("hello");
  await page.getByLabel("Message").press("Enter");
  await expect(page.getByTestId("answer").last()).toHaveAttribute("data-status", "done", { timeout: 30_000 });
  await expectAccessible(page);

  await page.getByRole("button", { name: "Tasks" }).click();
  await expect(page.getByLabel("New workspace")).toBeVisible();
  await expectAccessible(page);

  await page.getByRole("button", { name: "Members" }).click();
  await expect(page.getByTestId("member-row").first()).toBeVisible();
  await expectAccessible(page);

  await page.getByRole("button", { name: "Email preview" }).click();
  await page.getByLabel("Template").selectOption("alert_notification");
  await page.getByRole("button", { name: "Render" }).click();
  await expect(page.locator(".preview h2")).toContainText("Sample alert name");
  await expectAccessible(page);
});
