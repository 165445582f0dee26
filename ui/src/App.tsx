import { Fragment, useCallback, useEffect, useState, useSyncExternalStore } from "react";
import { describeError, type Problem } from "./api/errors";
import type { Api } from "./api/transport";
import type { AuthClient } from "./auth/auth";
import { ChatScreen } from "./components/ChatScreen";
import { EmailPreview } from "./components/EmailPreview";
import { MembersScreen } from "./components/MembersScreen";
import { OrganizationSwitcher } from "./components/OrganizationSwitcher";
import { ProblemNotice } from "./components/ProblemNotice";
import { TasksScreen } from "./components/TasksScreen";

type Screen = "chat" | "tasks" | "members" | "email";
const PATHS: Record<Screen, string> = { chat: "/", tasks: "/tasks", members: "/members", email: "/email" };

function screenOf(path: string): Screen {
  if (path.startsWith("/tasks")) return "tasks";
  if (path.startsWith("/members")) return "members";
  return path.startsWith("/email") ? "email" : "chat";
}

export function App({ auth, api }: { auth: AuthClient; api: Api }) {
  const identity = useSyncExternalStore(
    (listener) => auth.subscribe(listener),
    () => auth.identity,
  );
  const [starting, setStarting] = useState(true);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [screen, setScreen] = useState<Screen>(() => screenOf(window.location.pathname));

  useEffect(() => {
    let active = true;
    async function start(): Promise<void> {
      const here = new URL(window.location.href);
      try {
        if (here.pathname === "/oauth/callback") {
          const returnTo = await auth.completeSignIn(here);
          window.history.replaceState(null, "", returnTo);
          if (active) setScreen(screenOf(returnTo));
        } else if (auth.canRestore && !auth.identity) {
          await auth.refresh();
        }
      } catch (error) {
        if (here.pathname === "/oauth/callback") window.history.replaceState(null, "", "/");
        if (active) setProblem(describeError(error));
      } finally {
        if (active) setStarting(false);
      }
    }
    void start();
    return () => {
      active = false;
    };
  }, [auth]);

  useEffect(() => {
    const onPop = () => setScreen(screenOf(window.location.pathname));
    window.addEventListener("popstate", onPop);
    return () => window.removeEventListener("popstate", onPop);
  }, []);

  const signIn = useCallback(async () => {
    try {
      const url = await auth.beginSignIn(window.location.pathname);
      window.location.assign(url.toString());
    } catch (error) {
      setProblem({ title: "Sign-in unavailable", detail: `The sign-in server cannot be reached (${String(error)}).` });
    }
  }, [auth]);

  const signOut = useCallback(async () => {
    try {
      await auth.signOut();
    } catch (error) {
      setProblem(describeError(error));
    }
  }, [auth]);

  const report = useCallback((error: unknown) => {
    const described = describeError(error);
    if (!described.cancelled) setProblem(described);
  }, []);

  const go = (next: Screen) => {
    window.history.pushState(null, "", PATHS[next]);
    setScreen(next);
  };

  if (starting) {
    return (
      <main className="centered" aria-busy="true">
        <p>Loading…</p>
      </main>
    );
  }

  if (!identity) {
    return (
      <main className="centered">
        <h1>opsmesh</h1>
        <p>The operations assistant: chat with the AIOps agents, follow your tasks.</p>
        {problem ? <ProblemNotice problem={{ ...problem, signIn: false }} /> : null}
        <button type="button" className="primary" onClick={() => void signIn()}>
          Sign in
        </button>
      </main>
    );
  }

  const isAdmin = identity.roles.includes("admin");
  return (
    <div className="shell">
      <header className="topbar">
        <span className="brand">opsmesh</span>
        <nav aria-label="Main">
          <button type="button" aria-current={screen === "chat" ? "page" : undefined} onClick={() => go("chat")}>
            Chat
          </button>
          <button type="button" aria-current={screen === "tasks" ? "page" : undefined} onClick={() => go("tasks")}>
            Tasks
          </button>
          {isAdmin ? (
            <button type="button" aria-current={screen === "members" ? "page" : undefined} onClick={() => go("members")}>
              Members
            </button>
          ) : null}
          {isAdmin ? (
            <button type="button" aria-current={screen === "email" ? "page" : undefined} onClick={() => go("email")}>
              Email preview
            </button>
          ) : null}
        </nav>
        <OrganizationSwitcher api={api} auth={auth} identity={identity} onError={report} />
        <span className="who" data-testid="identity">
          {identity.subject} · {identity.orgId}
        </span>
        <button type="button" onClick={() => void signOut()}>
          Sign out
        </button>
      </header>
      {problem ? (
        <ProblemNotice problem={problem} onSignIn={() => void signIn()} onDismiss={() => setProblem(null)} />
      ) : null}
      {/* Keyed by organization: a switch mounts the screen anew, which loads that org's data. */}
      <Fragment key={identity.orgId}>
        {screen === "chat" ? <ChatScreen api={api} auth={auth} onError={report} /> : null}
        {screen === "tasks" ? <TasksScreen api={api} onError={report} /> : null}
        {screen === "members" && isAdmin ? (
          <MembersScreen api={api} me={identity.subject} onError={report} />
        ) : null}
        {screen === "email" && isAdmin ? <EmailPreview api={api} onError={report} /> : null}
      </Fragment>
    </div>
  );
}
