import { expect, newChat, screenshot, signIn, test } from "./fixtures";

test("tasks: a new workspace task appears and its status follows the worker live", async ({ page }) => {
  await signIn(page);
  await page.getByRole("button", { name: "Tasks" }).click();
  await expect(page).toHaveURL(/\/tasks$/);
  const name = `e2e-${Date.now().toString(36)}`;
  await page.getByLabel("New workspace").fill(name);
  await page.getByRole("button", { name: "Provision" }).click();
  const row = page.getByTestId("task-row").filter({ hasText: name });
  await expect(row).toBeVisible();
  // Published as pending; WatchTask then brings each change the worker records.
  await expect(row.getByTestId("task-status")).not.toHaveText("pending", { timeout: 20_000 });
  await screenshot(page, "04-tasks");
});

test("email preview for admins renders a template in a sandbox", async ({ page }) => {
  await signIn(page);
  await page.getByRole("button", { name: "Email preview" }).click();
  await expect(page.getByRole("heading", { name: "Email preview" })).toBeVisible();
  await page.getByLabel("Template").selectOption("alert_notification");
  await expect(page.getByLabel("Data (JSON)")).toHaveValue(/alert_name/); // sample data by type
  await page.getByRole("button", { name: "Render" }).click();
  await expect(page.locator(".preview h2")).toContainText("Sample alert name");
  const body = page.frameLocator('iframe[title="HTML body"]');
  await expect(body.locator("body")).toContainText("Sample summary");

  // A mistake in the data is named, field by field, not a blank screen.
  await page.getByLabel("Data (JSON)").fill('{"severity": "critical"}');
  await page.getByRole("button", { name: "Render" }).click();
  await expect(page.getByRole("alert")).toContainText("alert_name");
  await screenshot(page, "05-email-preview");
});

test("a narrow screen still reaches every control by keyboard", async ({ page }) => {
  await page.setViewportSize({ width: 390, height: 800 });
  await signIn(page);
  await newChat(page, "keyboard");
  await page.keyboard.type("hello");
  await page.keyboard.press("Enter");
  await expect(page.getByTestId("answer").last()).toHaveAttribute("data-status", /streaming|done/);
  await screenshot(page, "06-narrow");
});
