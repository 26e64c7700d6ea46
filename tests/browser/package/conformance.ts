// The implementation against its declarations: ./impl holds the packed roomwire.js (type-checked
// as JavaScript, checkJs) without roomwire.d.ts, so each assignment below fails to compile when
// the JavaScript does not provide what the declarations promise.
import * as declared from '@roomwire/client';
import * as impl from './impl/roomwire.js';

export const client: typeof declared.RoomwireClient = impl.RoomwireClient;
export const error: typeof declared.RoomwireError = impl.RoomwireError;
export const errorCode: typeof declared.ErrorCode = impl.ErrorCode;
export const closeCode: typeof declared.CloseCode = impl.CloseCode;

// Nothing exported that the declarations do not name, and nothing declared that is not exported.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
export const sameExports: Same<keyof typeof impl, keyof typeof declared> = true;
