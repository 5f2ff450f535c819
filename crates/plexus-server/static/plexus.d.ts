// Types of plexus.js, the Plexus browser client (see plexus.js for the behaviour).

export declare const VERSION: string;

/** Codes of errors the client makes itself; server error codes are 100 and up. */
export declare const ErrorCode: Readonly<{
  /** No reply within `timeout` ms. */
  timeout: 0;
  /** The offline queue already holds `maxQueued` commands. */
  queueFull: 1;
  /** The connection ended before the reply came. */
  connectionClosed: 2;
  unsubscribed: 3;
  /** disconnect() was called, or the client stopped. */
  disconnected: 4;
  /** The server sent something that is not the protocol. */
  badReply: 5;
}>;

/** Codes of `connecting` / `disconnected` / `subscribing` / `unsubscribed` events made by the
 *  client itself. Server close codes (3000+), WebSocket close codes (1000+) and unsubscribe
 *  codes (2000+) are passed through unchanged. */
export declare const ClientCode: Readonly<{
  connectCalled: 0;
  disconnectCalled: 1;
  transportClosed: 2;
  noPing: 3;
  connectTimeout: 4;
  subscribeTimeout: 5;
  tokenExpired: 6;
  unauthorized: 7;
  badProtocol: 8;
  emulationFailed: 9;
  unsubscribeCalled: 10;
}>;

/** What a failed command rejects with: `code` is a server error code (100+) or an ErrorCode. */
export declare class PlexusError extends Error {
  constructor(code: number, message: string, temporary?: boolean);
  readonly code: number;
  readonly temporary: boolean;
}

/** Throw this from a getToken function to say the user may not connect (or subscribe). */
export declare class UnauthorizedError extends Error {
  constructor(message?: string);
}

/** Full-jitter backoff: a delay in [0, min(max, min * 2^attempt)] ms. */
export declare function backoff(attempt: number, min: number, max: number, random?: () => number): number;

export type State = 'disconnected' | 'connecting' | 'connected';
export type SubscriptionState = 'unsubscribed' | 'subscribing' | 'subscribed';
export type TransportName = 'websocket' | 'sse' | 'http_stream';

export interface TransportEndpoint {
  transport: TransportName;
  /** ws(s):// or http(s):// URL, or a path relative to the page. */
  endpoint: string;
}

/** Time as the client sees it; inject a fake one in tests. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(timer: unknown): void;
}

export interface PlexusOptions {
  /** Connection token (JWT). */
  token?: string;
  /** Gives a (new) connection token: called when there is none, on error 109, and before a
   *  connection with a ttl expires. Throw UnauthorizedError to stop. */
  getToken?: (ctx: {}) => Promise<string> | string;
  /** Sent in connect as the client's name. Default 'plexus.js'. */
  name?: string;
  /** Sent in connect as `data`. */
  data?: unknown;
  /** Log to console.debug. */
  debug?: boolean;
  /** Default 500 ms. */
  minReconnectDelay?: number;
  /** Default 20000 ms. */
  maxReconnectDelay?: number;
  /** Timeout of each command (and of the connect), default 5000 ms. */
  timeout?: number;
  /** Commands kept while not connected, default 1000. */
  maxQueued?: number;
  /** Allowed silence beyond the server's ping interval, default 5000 ms. */
  pingMargin?: number;
  /** Transports to try in order on the first connect; the one that worked is kept. */
  transports?: TransportEndpoint[];
  /** WebSocket constructor, e.g. `ws` in Node. Default globalThis.WebSocket. */
  websocket?: unknown;
  /** EventSource constructor for the sse transport. Default globalThis.EventSource. */
  eventsource?: unknown;
  /** fetch for http_stream and emulation requests. Default globalThis.fetch. */
  fetch?: typeof fetch;
  /** Where SSE / HTTP-streaming commands are POSTed. Default /emulation on the host of the
   *  first stream transport. */
  emulationEndpoint?: string;
  clock?: Clock;
  /** Random numbers in [0, 1) for the backoff jitter. Default Math.random. */
  random?: () => number;
}

export interface ClientInfo {
  user: string;
  client: string;
  connInfo?: unknown;
  chanInfo?: unknown;
}

export interface Publication {
  channel: string;
  data: unknown;
  /** Position in the channel's stream; 0 in channels without history. */
  offset: number;
  info?: ClientInfo;
  tags?: Record<string, string>;
}

export interface StreamPosition {
  offset: number;
  epoch: string;
}

export interface StateContext<S> {
  oldState: S;
  newState: S;
}

export interface CodeReason {
  code: number;
  reason: string;
}

export interface ConnectedContext {
  client: string;
  transport: TransportName;
  data?: unknown;
}

export interface ErrorContext {
  type: 'transport' | 'connect' | 'connectToken' | 'refresh' | 'protocol' | 'subscribe' | 'subscribeToken';
  error: PlexusError | Error;
  transport?: TransportName;
  channel?: string;
}

export interface SubscribedContext {
  channel: string;
  recoverable: boolean;
  positioned: boolean;
  /** The subscribe asked to recover from the last position seen. */
  wasRecovering: boolean;
  /** Every missed publication was recovered (false: there may be a gap). */
  recovered: boolean;
  position: StreamPosition;
  data?: unknown;
}

export interface JoinLeaveContext {
  channel: string;
  info: ClientInfo;
}

export interface ClientEvents {
  state: StateContext<State>;
  connecting: CodeReason;
  connected: ConnectedContext;
  disconnected: CodeReason;
  error: ErrorContext;
  /** Publications of server-side subscriptions. */
  publication: Publication;
  /** Asynchronous messages from the server. */
  message: { data: unknown };
  /** Server-side subscriptions. */
  subscribed: SubscribedContext;
  unsubscribed: CodeReason & { channel: string };
  join: JoinLeaveContext;
  leave: JoinLeaveContext;
}

export interface SubscriptionEvents {
  state: StateContext<SubscriptionState> & { channel: string };
  subscribing: CodeReason & { channel: string };
  subscribed: SubscribedContext;
  unsubscribed: CodeReason & { channel: string };
  publication: Publication;
  join: JoinLeaveContext;
  leave: JoinLeaveContext;
  error: ErrorContext;
}

declare class Emitter<Events> {
  /** Adds a listener; the returned function removes it. */
  on<E extends keyof Events>(event: E, fn: (ctx: Events[E]) => void): () => void;
  once<E extends keyof Events>(event: E, fn: (ctx: Events[E]) => void): () => void;
  /** Removes one listener, or all of `event` without `fn`. */
  off<E extends keyof Events>(event: E, fn?: (ctx: Events[E]) => void): void;
}

export interface SubscriptionOptions {
  /** Subscription token (private namespaces). */
  token?: string;
  getToken?: (ctx: { channel: string }) => Promise<string> | string;
  /** Ask for join/leave pushes. */
  joinLeave?: boolean;
  /** Resubscribe from the last position seen (default true). */
  recover?: boolean;
  /** Sent in subscribe as `data`. */
  data?: unknown;
  /** Ask for delta compression ('fossil'): publications come as deltas from the previous one
   *  where the namespace allows it (`allowed_delta_types`), and are rebuilt by the client. */
  delta?: 'fossil';
  /** Only publications whose tags match are sent (namespaces with `allow_tags_filter`);
   *  Centrifugo's filter tree, not together with `delta`. */
  tagsFilter?: FilterNode;
}

/** A tags filter: a comparison of one tag (`key`, `cmp`, `val` or `vals`) or `and`/`or`/`not`
 *  of `nodes`. */
export interface FilterNode {
  op?: 'and' | 'or' | 'not';
  key?: string;
  cmp?: 'eq' | 'neq' | 'in' | 'nin' | 'ex' | 'nex' | 'sw' | 'ew' | 'ct' | 'gt' | 'gte' | 'lt' | 'lte';
  val?: string;
  vals?: string[];
  nodes?: FilterNode[];
}

export interface HistoryOptions {
  /** Publications at most (0 or omitted: only the position; -1: all kept). */
  limit?: number;
  since?: StreamPosition;
  reverse?: boolean;
}

export interface HistoryResult {
  publications: Publication[];
  offset: number;
  epoch: string;
}

export interface PresenceResult {
  clients: Record<string, ClientInfo>;
}

export interface PresenceStatsResult {
  numClients: number;
  numUsers: number;
}

export declare class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  readonly state: SubscriptionState;
  /** The last position seen (what a resubscribe recovers from), or null. */
  readonly position: StreamPosition | null;
  subscribe(): void;
  unsubscribe(): void;
  publish(data: unknown): Promise<{}>;
  presence(): Promise<PresenceResult>;
  presenceStats(): Promise<PresenceStatsResult>;
  history(options?: HistoryOptions): Promise<HistoryResult>;
}

export declare class Plexus extends Emitter<ClientEvents> {
  /** `url`: the WebSocket endpoint (e.g. '/connection/websocket'), or a transport list. */
  constructor(url: string | TransportEndpoint[] | null, options?: PlexusOptions);
  readonly state: State;
  /** The client id of the current connection. */
  readonly client: string | null;
  /** The transport of the current (or last) connection. */
  readonly transport: TransportName | null;
  connect(): void;
  disconnect(): void;
  /** The token of the next connect. */
  setToken(token: string): void;
  newSubscription(channel: string, options?: SubscriptionOptions): Subscription;
  getSubscription(channel: string): Subscription | null;
  removeSubscription(sub: Subscription): void;
  subscriptions(): Record<string, Subscription>;
  /** Queued while not connected (at most maxQueued) and sent after the next connect; resolves
   *  when the server acknowledges. */
  publish(channel: string, data: unknown): Promise<{}>;
  presence(channel: string): Promise<PresenceResult>;
  presenceStats(channel: string): Promise<PresenceStatsResult>;
  history(channel: string, options?: HistoryOptions): Promise<HistoryResult>;
  rpc(method: string, data?: unknown): Promise<{ data: unknown }>;
  /** An asynchronous message to the server (no reply); false when not connected. */
  send(data: unknown): boolean;
}

export default Plexus;

/** The target a Fossil delta describes, given its source; throws if it does not apply. */
export function applyFossilDelta(source: Uint8Array, delta: Uint8Array): Uint8Array;
