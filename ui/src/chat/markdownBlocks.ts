const FENCE = /^ {0,3}(`{3,}|~{3,})/;

/**
 * Splits Markdown into top-level blocks at blank lines outside fenced code, so a streaming answer
 * re-parses only its last (growing) block: the finished ones keep their rendered output (memoized).
 * An unclosed fence keeps everything after it in the last block.
 *
 * The split is for streaming only: a construct spanning blocks (a reference-style link definition,
 * a footnote) renders right once the whole answer is rendered in one pass at the end.
 */
export function splitBlocks(markdown: string): string[] {
  const blocks: string[] = [];
  let current: string[] = [];
  let fence: string | null = null;
  for (const line of markdown.split("\n")) {
    const marker = FENCE.exec(line)?.[1];
    if (fence) {
      if (marker && marker[0] === fence[0] && marker.length >= fence.length && line.trim() === marker) fence = null;
    } else if (marker) {
      fence = marker;
    } else if (line.trim() === "") {
      if (current.length) blocks.push(current.join("\n"));
      current = [];
      continue;
    }
    current.push(line);
  }
  if (current.length || blocks.length === 0) blocks.push(current.join("\n"));
  return blocks;
}
