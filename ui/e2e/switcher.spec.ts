import { expect, expectAccessible, password, screenshot, signIn, test, user } from "./fixtures";
import { INVITATION_LINK, linkMailedTo } from "./mail";

// The admin of a second organization (tests/test_web_e2e.py creates them) and the dev user's
// address (devtools/stack.py DEV_USER_EMAIL).
const secondOrg = process.env.OPSMESH_E2E_SECOND_ORG ?? "";
const secondAdmin = { user: process.env.OPSMESH_E2E_SECOND_USER ?? "", password: process.env.OPSMESH_E2E_SECOND_PASSWORD ?? "" };
const devEmail = "dev@example.com";

test("switcher: an existing user accepts an invitation to a second organization and switches between both", async ({
  page,
  browser,
}) => {
  test.skip(!secondOrg, "needs the second organization's admin (tests/test_web_e2e.py creates one)");

  // The second organization's admin invites the dev user's address.
  const theirs = await browser.newContext({ baseURL: test.info().project.use.baseURL });
  const admin = await theirs.newPage();
  await signIn(admin, secondAdmin);
  await admin.getByRole("button", { name: "Members" }).click();
  const invitedAt = Date.now();
  await admin.getByLabel("Email").fill(devEmail);
  await admin.getByRole("button", { name: "Invite" }).click();
  await expect(admin.getByRole("status")).toHaveText(`Invitation sent to ${devEmail}.`);
  await theirs.close();

  // The dev user, who has an account, signs in on the invitation page to accept.
  const link = await linkMailedTo(devEmail, INVITATION_LINK, invitedAt);
  await page.goto(link);
  await expect(page.getByText("You already have an account")).toBeVisible();
  await page.getByLabel("User name").fill(user);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Sign in and join" }).click();
  await expect(page.getByRole("status")).toContainText("as member");

  // Signed in to their own organization as before, now with a choice of two.
  await signIn(page);
  await page.getByRole("button", { name: "Tasks" }).click();
  await expect(page.getByTestId("identity")).toHaveText(`${user} · dev`);
  const organization = page.getByLabel("Organization");
  await expect(organization.locator("option")).toHaveCount(2);
  await expectAccessible(page);

  // Switching asks for no password; the open screen reloads as a member of the other org.
  await organization.selectOption(secondOrg);
  await page.getByRole("button", { name: "Switch" }).click();
  await expect(page.getByTestId("identity")).toHaveText(`${user} · ${secondOrg}`);
  await expect(page).toHaveURL(/\/tasks$/);
  await expect(page.getByLabel("New workspace")).toBeVisible();
  await expect(page.getByRole("button", { name: "Members" })).toHaveCount(0); // a member there
  await screenshot(page, "switcher-01-second-org");

  // A reload keeps the organization (the refresh token is the second org's now); and back.
  await page.reload();
  await expect(page.getByTestId("identity")).toHaveText(`${user} · ${secondOrg}`);
  await page.getByLabel("Organization").selectOption("dev");
  await page.getByRole("button", { name: "Switch" }).click();
  await expect(page.getByTestId("identity")).toHaveText(`${user} · dev`);
  await expect(page.getByRole("button", { name: "Members" })).toBeVisible();
});
